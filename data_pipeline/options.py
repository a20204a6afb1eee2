"""Typed settings of a preprocessing run: what to read, how to filter, where and how to write.

A recipe (YAML, :mod:`data_pipeline.recipes`) fills the same dataclasses as the command line; command
line flags override the recipe.  Everything is validated by :meth:`PreprocessOptions.validate`
*before* any file is written or any worker starts, and every problem is one
:class:`PreprocessError` line naming the setting.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Union

from anygpt import modalities as registry
from anygpt.config import ConfigError, to_dict
from anygpt.modalities.plugin import CodecError

SOURCES = ("manifest", "librispeech", "commonvoice", "wds-pairs", "anygpt-jsonl", "conversations")
Source = Literal["manifest", "librispeech", "commonvoice", "wds-pairs", "anygpt-jsonl", "conversations"]
ENGINES = ("local", "ray")
Engine = Literal["local", "ray"]


class PreprocessError(ConfigError):
    """A setting or input path that makes the run impossible (one line, raised before any work)."""


def _env_int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise PreprocessError(f"{key}: not an integer ({env[key]!r})") from None


def resolve_rank(rank: Optional[int], world_size: Optional[int], env: Mapping[str, str]) -> tuple[int, int, str]:
    """``(rank, world_size, where_from)`` of a preprocessing process, first match wins.

    1. ``--rank`` and ``--world-size`` (both, or neither).
    2. torchrun's ``RANK`` / ``WORLD_SIZE``.
    3. A SLURM array task: element ``SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN`` (divided by
       ``SLURM_ARRAY_TASK_STEP`` for ``--array=0-30:10``) of ``SLURM_ARRAY_TASK_COUNT``; an element
       running several tasks (``srun`` with ``SLURM_NTASKS`` > 1) holds ranks
       ``element * SLURM_NTASKS + SLURM_PROCID``.  In an array task every element sees
       ``SLURM_PROCID=0, SLURM_NTASKS=1``, so without this every element would redo every chunk.
       With ``--world-size W`` alone the array *ids* are the ranks (``element = SLURM_ARRAY_TASK_ID``):
       that is how a resubmission of some ranks (``sbatch --array=1,3 ... --world-size 4``) keeps
       the original world size.
    4. ``SLURM_PROCID`` / ``SLURM_NTASKS`` (``srun -n N`` without an array).
    5. ``0`` / ``1``.
    """
    array = "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env
    if rank is None and world_size is not None and array:
        ntasks = _env_int(env, "SLURM_NTASKS") if "SLURM_NTASKS" in env else 1
        procid = _env_int(env, "SLURM_PROCID") if "SLURM_PROCID" in env else 0
        rank, where = _env_int(env, "SLURM_ARRAY_TASK_ID") * ntasks + procid, "SLURM array id (--world-size given)"
    elif rank is not None or world_size is not None:
        if (rank is None) != (world_size is None):
            raise PreprocessError("--rank and --world-size go together (or --world-size alone in a SLURM array task)")
        where = "--rank/--world-size"
    elif "RANK" in env and "WORLD_SIZE" in env:
        rank, world_size, where = _env_int(env, "RANK"), _env_int(env, "WORLD_SIZE"), "RANK/WORLD_SIZE"
    elif array:
        task, count = _env_int(env, "SLURM_ARRAY_TASK_ID"), _env_int(env, "SLURM_ARRAY_TASK_COUNT")
        low = _env_int(env, "SLURM_ARRAY_TASK_MIN") if "SLURM_ARRAY_TASK_MIN" in env else 0
        step = _env_int(env, "SLURM_ARRAY_TASK_STEP") if "SLURM_ARRAY_TASK_STEP" in env else 1
        element, odd = divmod(task - low, max(1, step))
        if odd or not 0 <= element < count:
            raise PreprocessError(f"SLURM array task {task} is not element [0, {count}) of an array starting at {low} "
                                  f"with step {step}; for an array of chosen ids pass --world-size (ids are then ranks)")
        ntasks = _env_int(env, "SLURM_NTASKS") if "SLURM_NTASKS" in env else 1
        procid = _env_int(env, "SLURM_PROCID") if "SLURM_PROCID" in env else 0
        rank, world_size, where = element * ntasks + procid, count * ntasks, "SLURM array task"
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world_size, where = _env_int(env, "SLURM_PROCID"), _env_int(env, "SLURM_NTASKS"), "SLURM_PROCID/SLURM_NTASKS"
    else:
        rank, world_size, where = 0, 1, "default"
    if world_size < 1:
        raise PreprocessError(f"--world-size: must be >= 1, got {world_size} (from {where})")
    if not 0 <= rank < world_size:
        raise PreprocessError(f"--rank: {rank} is outside [0, {world_size}) (from {where})")
    return rank, world_size, where


@dataclass
class Limits:
    """Duration limits for one modality (override the global ones in :class:`Filters`)."""

    min_seconds: Optional[float] = None
    max_seconds: Optional[float] = None
    clip_seconds: Optional[float] = None


@dataclass
class Filters:
    """What makes an input unusable (skipped and counted) and what is merely trimmed.

    Attributes:
        min_text_chars: pair texts shorter than this (after text normalisation) are skipped; an
            empty text is always ``empty_text`` (conversations only need every turn non-empty).
        max_text_chars: longer pair texts are skipped (``text_too_long``), not truncated: a cut
            caption no longer describes its picture.
        drop_text_matching: regular expressions searched in the text *as read* (before
            normalisation); a match skips the input (``text_filtered``), e.g. GigaSpeech's
            ``<SIL>``/``<MUSIC>`` garbage utterances.
        min_seconds / max_seconds: audio whose *original* duration lies outside is skipped
            (``too_short`` / ``too_long``).
        clip_seconds: longer audio is truncated to this many seconds (``json.media[k].truncated``).
        per_modality: overrides of the three duration settings by modality name (any registered
            modality whose items have a duration), e.g. ``{speech: {max_seconds: 40}}``.
        min_image_side: images whose shorter side is smaller are skipped (``image_too_small``).
        max_aspect_ratio: images with long/short side above this are skipped (``bad_aspect_ratio``).
        min_meta / max_meta: numeric bounds on ``meta`` fields (e.g. ``aesthetic: 5.0``,
            ``up_votes: 2``); a missing or non-numeric field fails the bound (``meta_filtered``).
    """

    min_text_chars: int = 1
    max_text_chars: Optional[int] = None
    drop_text_matching: list[str] = field(default_factory=list)
    min_seconds: Optional[float] = None
    max_seconds: Optional[float] = None
    clip_seconds: Optional[float] = None
    per_modality: dict[str, Limits] = field(default_factory=dict)
    min_image_side: Optional[int] = None
    max_aspect_ratio: Optional[float] = None
    min_meta: dict[str, float] = field(default_factory=dict)
    max_meta: dict[str, float] = field(default_factory=dict)

    def limits(self, modality: str) -> Limits:
        """Effective duration limits of a modality (its override, else the global ones)."""
        base = Limits(self.min_seconds, self.max_seconds, self.clip_seconds)
        over = self.per_modality.get(modality)
        if over is None:
            return base
        return Limits(*(getattr(over, f.name) if getattr(over, f.name) is not None else getattr(base, f.name)
                        for f in dataclasses.fields(Limits)))


@dataclass
class TextOptions:
    """Text normalisation applied to every caption/transcript/conversation text before filtering.

    ``replace`` is literal (applied in the order given), e.g. GigaSpeech's ``" <COMMA>": ","``.
    """

    strip: bool = True
    collapse_whitespace: bool = True
    lowercase: bool = False
    replace: dict[str, str] = field(default_factory=dict)


@dataclass
class Fields:
    """Where a reader finds things in a row/record (dotted paths reach into nested JSON).

    Attributes:
        id: the sample id field (default: ``id``, else a row number).
        text: the text field, or a list tried in order (first non-empty wins); for ``wds-pairs``
            ``txt`` means the ``.txt`` member and ``json.caption`` a field of the ``.json`` member.
        media: the field holding the media path (default: the column named like the modality).
        media_template: build the media path from row fields instead, e.g. ``audio/{ytid}.wav``.
        start / end: fields with segment bounds in seconds (a clip cut out of a longer file).
        meta: fields copied into ``json.meta`` (values kept as read).
    """

    id: Optional[str] = None
    text: Union[str, list[str], None] = None
    media: Optional[str] = None
    media_template: Optional[str] = None
    start: Optional[str] = None
    end: Optional[str] = None
    meta: list[str] = field(default_factory=list)

    def text_fields(self, default: list[str]) -> list[str]:
        if self.text is None:
            return list(default)
        return [self.text] if isinstance(self.text, str) else list(self.text)


@dataclass
class ReaderOptions:
    """Reader-specific switches (each reader reads only the ones it knows).

    Attributes:
        format: manifest format ``auto`` (by suffix) | ``jsonl`` | ``csv`` | ``tsv``.
        media_root: directory media paths are relative to (default: the manifest's directory).
        split: Common Voice TSV to read (``validated``, ``train``, ``dev``, ``test``...).
        audio_ext: audio suffixes tried for LibriSpeech/MLS utterances, in order.
        conversation_key: record field holding the turns (``conversations``/``anygpt-jsonl``);
            default: first of ``conversation``, ``conversations``, ``chat``, ``messages``.

    Which ``wds-pairs`` members are media is not a setting: a member is media of the modality whose
    plugin claims its suffix (:attr:`anygpt.modalities.plugin.Modality.suffixes`).
    """

    format: Literal["auto", "jsonl", "csv", "tsv"] = "auto"
    media_root: Optional[str] = None
    split: str = "validated"
    audio_ext: list[str] = field(default_factory=lambda: [".flac", ".wav", ".opus", ".mp3", ".ogg"])
    conversation_key: Optional[str] = None


@dataclass
class PreprocessOptions:
    """One preprocessing run (one rank).  ``codecs=None`` with ``tiny=True`` uses the tiny codecs;
    ``codec_names`` (``--codec NAME``, with ``tiny`` only) picks a non-default codec of a modality.

    ``engine`` runs this rank's chunks in local processes (``workers``) or on a Ray cluster
    (``ray``: ``ray_address``, else ``RAY_ADDRESS``, else a local Ray instance; one actor per GPU,
    else ``workers`` actors of ``ray_actor_cpus`` CPUs each)."""

    source: Optional[str] = None
    input: Optional[str] = None
    out: Optional[str] = None
    codecs: Optional[str] = None
    tiny: bool = False
    codec_names: list[str] = field(default_factory=list)
    workers: int = 1
    shard_size: int = 1000
    shard_bytes: Optional[int] = None
    rank: Optional[int] = None
    world_size: Optional[int] = None
    prefix: str = "shard"
    batch_size: int = 16
    device: str = "auto"
    limit: Optional[int] = None
    modality: Optional[str] = None
    corpus: Optional[str] = None
    recipe: Optional[str] = None
    overwrite: bool = False
    progress: Optional[bool] = None
    engine: Engine = "local"
    ray_address: Optional[str] = None
    ray_actor_cpus: float = 1.0
    fields: Fields = field(default_factory=Fields)
    filters: Filters = field(default_factory=Filters)
    text: TextOptions = field(default_factory=TextOptions)
    reader: ReaderOptions = field(default_factory=ReaderOptions)

    # ------------------------------------------------------------------ validation
    def resolve_rank(self) -> tuple[int, int]:
        """This process's ``(rank, world_size)`` (:func:`resolve_rank` on ``os.environ``)."""
        rank, world, _ = resolve_rank(self.rank, self.world_size, os.environ)
        return rank, world

    def needs_codecs(self) -> bool:
        return self.source != "anygpt-jsonl"

    def codec_choice(self) -> dict[str, str]:
        """``--codec`` names -> ``{modality: codec name}`` (the modality whose cards include the name)."""
        try:
            return registry.choose_codecs(self.codec_names)
        except CodecError as e:
            raise PreprocessError(f"--codec: {e}") from None

    def run_cards(self) -> dict[str, dict[str, Any]]:
        """The card of each registered modality's codec in this run (no weights read).

        A codecs directory's own cards (``DIR/<modality>/card.yaml``), else the ``--codec`` choice,
        else the modality's default card.  They fix the code checks, the layout that token strings
        are parsed with, the LM-token accounting and the codec names recorded in the shards.
        """
        try:
            found = registry.directory_cards(self.codecs) if self.codecs else {}
            chosen = self.codec_choice()
            return {m: found.get(m) or registry.codec_card(m, chosen.get(m)) for m in registry.names()}
        except CodecError as e:
            raise PreprocessError(f"--codecs: {str(e).splitlines()[0] if str(e) else e}") from None

    def validate(self) -> None:
        """Raise :class:`PreprocessError` on the first bad setting; touches no output."""
        if self.source is None:
            raise PreprocessError("--source: required (or a recipe that names one)")
        if self.source not in SOURCES:
            raise PreprocessError(f"--source: {self.source!r} is not one of {', '.join(SOURCES)}")
        if not self.input:
            raise PreprocessError("--input: required")
        if not Path(self.input).exists():
            raise PreprocessError(f"--input: {self.input} does not exist")
        if not self.out:
            raise PreprocessError("--out: required")
        if Path(self.out).exists() and not Path(self.out).is_dir():
            raise PreprocessError(f"--out: {self.out} exists and is not a directory")
        if self.codecs and self.tiny:
            raise PreprocessError("--codecs and --tiny are exclusive")
        if self.codec_names and not self.tiny:
            raise PreprocessError("--codec: only with --tiny (a codecs directory's card.yaml says which codec it holds)")
        self.codec_choice()
        if self.needs_codecs() and not self.codecs and not self.tiny:
            raise PreprocessError(f"source {self.source!r} encodes media: give --codecs DIR or --tiny")
        if self.codecs and not Path(self.codecs).is_dir():
            raise PreprocessError(f"--codecs: {self.codecs} is not a directory")
        for name in ("workers", "shard_size", "batch_size"):
            if getattr(self, name) < 1:
                raise PreprocessError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(self, name)}")
        if self.shard_bytes is not None and self.shard_bytes < 1024:
            raise PreprocessError(f"--shard-bytes: must be >= 1024, got {self.shard_bytes}")
        if self.limit is not None and self.limit < 0:
            raise PreprocessError(f"--limit: must be >= 0, got {self.limit}")
        known = registry.names()
        if self.modality is not None and self.modality not in known:
            raise PreprocessError(f"--modality: {self.modality!r} is not a registered modality "
                                  f"(known: {', '.join(known)})")
        if not re.fullmatch(r"[A-Za-z0-9_]+", self.prefix or ""):
            raise PreprocessError(f"--prefix: {self.prefix!r} must match [A-Za-z0-9_]+ (no '-' or '.')")
        if self.engine not in ENGINES:
            raise PreprocessError(f"--engine: {self.engine!r} is not one of {', '.join(ENGINES)}")
        if not self.ray_actor_cpus > 0:
            raise PreprocessError(f"--ray-actor-cpus: must be > 0, got {self.ray_actor_cpus}")
        if not (self.device in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", self.device)):
            raise PreprocessError(f"--device: {self.device!r} is not auto, cpu, cuda or cuda:N")
        f = self.filters
        for m in f.per_modality:
            if m not in known:
                raise PreprocessError(f"filters.per_modality.{m}: not a registered modality (known: {', '.join(known)})")
        scopes = [("filters", f), *((f"filters.per_modality.{m}", lim) for m, lim in f.per_modality.items())]
        for name in ("min_seconds", "max_seconds", "clip_seconds", "max_aspect_ratio"):
            for scope, obj in scopes:
                v = getattr(obj, name, None)
                if v is not None and v <= 0:
                    raise PreprocessError(f"{scope}.{name}: must be > 0, got {v}")
        for scope, m in (("filters", None), *((f"filters.per_modality.{m}", m) for m in f.per_modality)):
            lim = f.limits(m) if m else Limits(f.min_seconds, f.max_seconds)
            if lim.min_seconds is not None and lim.max_seconds is not None and lim.min_seconds > lim.max_seconds:
                raise PreprocessError(f"{scope}: min_seconds {lim.min_seconds} > max_seconds {lim.max_seconds}")
        if f.min_text_chars < 0:
            raise PreprocessError(f"filters.min_text_chars: must be >= 0, got {f.min_text_chars}")
        if f.max_text_chars is not None and f.max_text_chars < max(1, f.min_text_chars):
            raise PreprocessError(f"filters.max_text_chars: {f.max_text_chars} is below min_text_chars")
        if f.max_aspect_ratio is not None and f.max_aspect_ratio < 1:
            raise PreprocessError(f"filters.max_aspect_ratio: must be >= 1, got {f.max_aspect_ratio}")
        for pat in f.drop_text_matching:
            try:
                re.compile(pat)
            except re.error as e:
                raise PreprocessError(f"filters.drop_text_matching: bad regular expression {pat!r} ({e})") from None
        if self.fields.media_template is not None:
            try:
                names = [n for _, n, _, _ in string.Formatter().parse(self.fields.media_template) if n]
            except ValueError as e:
                raise PreprocessError(f"fields.media_template: {e}") from None
            if not names:
                raise PreprocessError("fields.media_template: names no field (e.g. 'audio/{ytid}.wav')")
        self.resolve_rank()

    # ------------------------------------------------------------------ identity of the output
    def fingerprint(self) -> dict[str, Any]:
        """Settings that determine the output; a rerun into the same OUT must match them.

        Workers, rank, world size, device, progress and the engine are deliberately absent: they change who
        writes which shard, never what a shard holds.  ``codec_names`` are the run's codecs by
        modality, so a rerun with another codec (``--codec``) is refused.
        """
        return {
            "format": 1,
            "source": self.source,
            "input": str(Path(self.input).resolve()) if self.input else None,
            "codecs": "tiny" if self.tiny else (str(Path(self.codecs).resolve()) if self.codecs else None),
            "codec_names": {m: card["name"] for m, card in self.run_cards().items()},
            "shard_size": self.shard_size,
            "shard_bytes": self.shard_bytes,
            "prefix": self.prefix,
            "batch_size": self.batch_size,
            "limit": self.limit,
            "modality": self.modality,
            "corpus": self.corpus,
            "fields": to_dict(self.fields),
            "filters": to_dict(self.filters),
            "text": to_dict(self.text),
            "reader": to_dict(self.reader),
        }

    def fingerprint_hash(self) -> str:
        blob = json.dumps(self.fingerprint(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]
