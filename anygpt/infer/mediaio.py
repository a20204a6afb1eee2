"""Files in and out of a conversation: media files -> code spans, generated spans -> files.

Everything that depends on the kind of media is asked of the modality's plugin
(:class:`anygpt.modalities.plugin.Modality`): which suffixes it reads (:attr:`suffixes`), how a file
becomes codec input (:meth:`read`: audio is mono, resampled and clipped to the plugin's
``max_input_seconds``, since a 3-minute song would not fit any context), how the LM's codes become
the codes its codec decodes (:meth:`complete_codes`: speech's SoundStorm step fills RVQ layers 2-8,
continuing a voice prompt's codes when one is given), the decode options of its renderer
(``render_options``: the image renderer's unCLIP steps and guidance) and how decoded media becomes a
file (:meth:`write`, with ``output_suffix``).

Codecs and the acoustic (SoundStorm) decoder are loaded on first use, so a text-only chat never pays
for them.  Where they come from: ``--codecs DIR`` (one subdirectory per modality, each a codec
directory with its card) or ``tiny`` (random codecs for tests and demos), defaulting to
``MODEL/codecs``; ``--soundstorm DIR|FILE.pt|tiny|none``, defaulting to ``MODEL/soundstorm`` then
``CODECS/soundstorm``.  A codecs directory must hold the codecs the model was trained with: its cards
are checked against the model's layout before anything is loaded.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from anygpt import modalities as registry
from anygpt.decoders.soundstorm import SoundStorm, SoundStormConfig
from anygpt.formats import Media
from anygpt.layout import VocabLayout
from anygpt.modalities.plugin import AudioModality, Modality, ReadOptions

# The key of the voice prompt's input limit in ``MediaIO.max_seconds`` (``--max-voice-seconds``).
VOICE = "voice"


def default_max_seconds(layout: VocabLayout | None = None) -> dict[str, float]:
    """Input limits in seconds: each modality's ``max_input_seconds`` and, under ``voice``, the
    ``prompt_max_seconds`` of the modality that takes a voice prompt (of ``layout``, or registered)."""
    plugins = {m: p for m, p in registry.registered().items() if layout is None or m in layout.modalities}
    out = {m: float(p.max_input_seconds) for m, p in plugins.items() if p.max_input_seconds is not None}
    voice = voice_modality(layout)
    if voice is not None and plugins[voice].prompt_max_seconds is not None:
        out[VOICE] = float(plugins[voice].prompt_max_seconds)
    return out


def voice_modality(layout: VocabLayout | None = None) -> str | None:
    """The modality that takes a voice prompt (``acoustic_prompt``), of ``layout`` or registered; None
    when there is none.  Its acoustic decoder is the ``--soundstorm`` one."""
    for name, plugin in registry.registered().items():
        if plugin.acoustic_prompt and (layout is None or name in layout.modalities):
            return name
    return None


class MediaInputError(ValueError):
    """A file given to the model cannot be used (the message names the file and what to do)."""


def _as_source(value: str | Path | None) -> str | Path | None:
    if value is None:
        return None
    if str(value) in ("tiny", "none"):
        return str(value)
    return Path(value)


def resolve_codecs(arg: str | None, model_dir: Path | None) -> str | Path | None:
    """``--codecs``: a directory, ``tiny``, or default ``MODEL/codecs`` when present (else None)."""
    if arg:
        src = _as_source(arg)
        if isinstance(src, Path) and not src.is_dir():
            raise MediaInputError(f"--codecs {arg}: no such directory (expected one codec directory per modality "
                                  f"inside: {', '.join(m + '/' for m in registry.names())})")
        return None if src == "none" else src
    if model_dir is not None and (model_dir / "codecs").is_dir():
        return model_dir / "codecs"
    return None


def resolve_soundstorm(arg: str | None, model_dir: Path | None, codecs: str | Path | None) -> str | Path | None:
    """``--soundstorm``: a directory / release ``.pt`` / ``tiny`` / ``none``; default ``MODEL/soundstorm``,
    then ``CODECS/soundstorm``; ``tiny`` codecs imply a tiny decoder."""
    if arg:
        src = _as_source(arg)
        if isinstance(src, Path) and not src.exists():
            raise MediaInputError(f"--soundstorm {arg}: no such directory or file")
        return None if src == "none" else src
    for cand in ([model_dir / "soundstorm"] if model_dir is not None else []) + (
            [codecs / "soundstorm"] if isinstance(codecs, Path) else []):
        if cand.exists():
            return cand
    return "tiny" if codecs == "tiny" else None


def unique_path(directory: Path, stem: str, suffix: str) -> Path:
    """``directory/stem.suffix``, or ``stem-2.suffix``... when taken (outputs never overwrite)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{stem}{suffix}"
    n = 2
    while path.exists():
        path = directory / f"{stem}-{n}{suffix}"
        n += 1
    return path


def slug(text: str, limit: int = 40) -> str:
    """A file-name-safe short form of ``text`` (for output names that say what they are)."""
    s = re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()
    return s[:limit].rstrip("-") or "out"


@dataclass
class Rendered:
    """A generated media part written to a file."""

    modality: str
    path: Path
    seconds: float | None = None
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        extra = f" ({self.seconds:.1f} s)" if self.seconds is not None else ""
        return f"{self.modality}: {self.path}{extra}"


class MediaIO:
    """Encodes input files and renders generated spans, with lazily loaded codecs and decoders.

    Args:
        layout: the vocabulary layout (which modalities the model has, with which codecs).
        codecs: codecs directory, ``"tiny"``, or None (media unavailable: a clear error on use).  A
            directory's cards must match ``layout`` (``LayoutError`` naming both codecs otherwise).
        soundstorm: the acoustic decoder of the voice-prompt modality: SoundStorm directory /
            release ``.pt`` / ``"tiny"`` / None (speech is then rendered from the semantic layer
            alone, with a note).
        device: where codecs and decoders run.
        max_seconds: input limits by modality, and ``voice`` for the voice prompt (defaults:
            :func:`default_max_seconds`); longer audio is cut to the limit with a note.
        render_options: modality -> decode options of its renderer (names from the plugin's
            ``render_options``; None values = the renderer's defaults), e.g. ``{"image": {"steps": 2}}``.
        seed: seeds sampling decoders (SoundStorm; None = fresh).
    """

    def __init__(self, layout: VocabLayout, codecs: str | Path | None, soundstorm: str | Path | None = None,
                 device: torch.device | str = "cpu", max_seconds: Mapping[str, float] | None = None,
                 render_options: Mapping[str, Mapping[str, Any]] | None = None, seed: int | None = None) -> None:
        self.layout = layout
        self.codecs_source = codecs
        self.soundstorm_source = soundstorm
        self.device = torch.device(device)
        self.max_seconds = {**default_max_seconds(layout), **(max_seconds or {})}
        self.render_options = check_render_options(render_options or {})
        self.seed = seed
        self.voice_modality = voice_modality(layout)
        self._codecs: dict[str, Any] = {}
        self._soundstorm: Any = None
        self._soundstorm_loaded = False
        self._told: set[str] = set()  # notes of complete_codes already given (each is given once)
        if isinstance(codecs, Path):
            # Only the cards are read here (no weights): a codecs directory of another codec (Mimi's
            # 2048 speech ids for a SpeechTokenizer model) fails now, naming both codecs.
            layout.check_cards(registry.directory_cards(codecs), f"--codecs {codecs}")

    def plugin(self, modality: str) -> Modality:
        """The plugin of one of the model's modalities (``MediaInputError`` for one it lacks)."""
        if modality not in self.layout.modalities:
            raise MediaInputError(no_modality(self.layout, modality))
        return registry.get(modality)

    # ------------------------------------------------------------------ loading
    def codec(self, modality: str) -> Any:
        """The codec for ``modality``, loaded on first use."""
        if modality in self._codecs:
            return self._codecs[modality]
        self.plugin(modality)
        src = self.codecs_source
        if src is None:
            raise MediaInputError(f"no {modality} codec: pass --codecs DIR (with {modality}/ inside) or --codecs tiny")
        if src == "tiny":
            # The tiny codec of the codec the range was made for (the default one when unrecorded).
            codec = registry.build_codec(modality, "tiny", codec=self.layout.modalities[modality].codec)
        else:
            codec = registry.build_codec(modality, registry.codec_dir(src, modality))
        codec = codec.to(self.device).eval()
        self._codecs[modality] = codec
        return codec

    def soundstorm(self) -> Any:
        """The acoustic decoder (SoundStorm), or None when there is none; loaded on first use."""
        if self._soundstorm_loaded:
            return self._soundstorm
        src = self.soundstorm_source
        model = None
        if src == "tiny":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model = SoundStorm(SoundStormConfig.tiny())
        elif isinstance(src, Path):
            if src.is_dir():
                model = SoundStorm.from_pretrained(src)
            else:  # AnyGPT's released speechtokenizer_soundstorm_mls.pt
                model = SoundStorm.load_anygpt_release(src)
        if model is not None:
            model = model.to(self.device).eval()
        self._soundstorm, self._soundstorm_loaded = model, True
        return model

    # ------------------------------------------------------------------ inputs
    def _check_file(self, path: Path, modality: str) -> None:
        """Refuse a missing file, a directory, or a suffix that plainly belongs to another family of
        media (a ``.png`` given as speech), pointing to the commands that take it."""
        if not path.exists():
            raise MediaInputError(f"{path}: no such file")
        if path.is_dir():
            raise MediaInputError(f"{path}: is a directory, not a {modality} file")
        ext = path.suffix.lower()
        if ext in registry.get(modality).suffixes:
            return
        owners = [m for m, p in registry.registered().items() if ext in p.suffixes]
        if owners:
            usable = [f"/{m}" for m in owners if m in self.layout.modalities]
            hint = f"; use {' or '.join(usable)}" if usable else ""
            raise MediaInputError(f"{path}: unsupported format for {modality} ({ext} is {'/'.join(owners)} "
                                  f"media{hint})")

    def read_file(self, modality: str, path: Path, limit_key: str) -> tuple[Any, Any, list[str]]:
        """Read ``path`` through ``modality``'s plugin, cut to ``max_seconds[limit_key]`` with a note
        when longer; returns ``(codec input, codec, notes)``."""
        plugin = self.plugin(modality)
        self._check_file(path, modality)
        codec = self.codec(modality)
        limit = self.max_seconds.get(limit_key)
        item, info = plugin.read(path, codec, ReadOptions(clip_seconds=limit))
        notes = []
        if info.get("truncated"):
            what = "a voice prompt" if limit_key == VOICE else modality
            notes.append(f"{path}: {info['orig_seconds']:.1f} s is longer than the {limit:g} s limit for {what}; "
                         f"using the first {limit:g} s")
        return item, codec, notes

    def encode_file(self, modality: str, path: str | Path) -> tuple[Media, list[str]]:
        """A media file -> a :class:`Media` part (all of the codec's codebooks) plus notes.

        Raises ``MediaInputError`` / ``MediaError`` / ``CodecError`` (all ``ValueError``) with one-line
        messages naming the file.
        """
        item, codec, notes = self.read_file(modality, Path(path).expanduser(), modality)
        codes = codec.encode([item])[0]
        return Media(modality, np.asarray(codes, dtype=np.int64)), notes

    def voice_prompt(self, path: str | Path) -> tuple[np.ndarray, list[str]]:
        """A recording of the voice to answer in -> its full codes (every codebook, e.g. ``[8, Tp]``)."""
        m = self.voice_modality
        if m is None:
            raise MediaInputError(f"this model has no modality that takes a voice prompt "
                                  f"(it has: {', '.join(self.layout.modalities) or 'text only'})")
        item, codec, notes = self.read_file(m, Path(path).expanduser(), VOICE)
        codes = np.asarray(codec.encode([item])[0], dtype=np.int64)
        if self.soundstorm_source is None:
            notes.append("no SoundStorm decoder (--soundstorm DIR): the voice prompt cannot be used for rendering")
        return codes, notes

    # ------------------------------------------------------------------ outputs
    def complete_codes(self, modality: str, codes: np.ndarray, voice: np.ndarray | None = None,
                       notes: list[str] | None = None) -> np.ndarray:
        """The LM's codes of one span ``[K, T]`` -> the codes ``modality``'s codec decodes (the plugin's
        :meth:`~anygpt.modalities.plugin.Modality.complete_codes`; speech: SoundStorm's 8 layers).

        Each distinct note is appended to ``notes`` once per session (a missing decoder is worth
        saying once, not at every answer).
        """
        plugin = self.plugin(modality)
        lm_codes = np.asarray(codes, dtype=np.int64)[: self.layout.modalities[modality].num_codebooks]
        # The one acoustic decoder belongs to the voice-prompt modality; others get none.
        acoustic = self.soundstorm if modality == self.voice_modality else (lambda: None)
        said: list[str] = []
        full = plugin.complete_codes(lm_codes, acoustic,
                                     voice if modality == self.voice_modality else None, said, seed=self.seed)
        for note in said:
            if note not in self._told:
                self._told.add(note)
                if notes is not None:
                    notes.append(note)
        return np.asarray(full, dtype=np.int64)

    def decode(self, media: Media, voice: np.ndarray | None = None, notes: list[str] | None = None) -> Any:
        """One generated span -> decoded media (what the plugin writes: a waveform, an image...)."""
        full = self.complete_codes(media.modality, media.codes, voice, notes)
        return self.codec(media.modality).decode([full], **self.render_options.get(media.modality, {}))[0]

    def render(self, media: Media, directory: Path, stem: str, voice: np.ndarray | None = None) -> Rendered:
        """Decode one generated span and write it under ``directory`` (never overwriting)."""
        m = media.modality
        plugin = self.plugin(m)
        notes: list[str] = []
        item = self.decode(media, voice, notes)
        codec = self.codec(m)
        path = plugin.write(unique_path(directory, stem, plugin.output_suffix), item, codec)
        return Rendered(m, Path(path), plugin.seconds(item, codec), notes)


def modality_for_file(layout: VocabLayout, suffix: str, family: type[Modality] = Modality) -> str:
    """The modality of ``layout`` that reads files ending in ``suffix`` (a page upload, an API part).

    Among several (a ``.wav`` is speech or music), the one whose paired text is a transcript: spoken
    audio is what a microphone records and what the OpenAI API's ``input_audio`` carries.  ``family``
    narrows the candidates to one plugin family (``ImageModality`` for an ``image_url`` part).
    Raises ``MediaInputError`` naming the suffixes the model does read.
    """
    ext = suffix.lower() if suffix.startswith(".") else f".{suffix.lower()}"
    plugins = {m: registry.get(m) for m in layout.modalities}
    owners = [m for m, p in plugins.items() if ext in p.suffixes and isinstance(p, family)]
    if not owners:
        readable = sorted({x for p in plugins.values() if isinstance(p, family) for x in p.suffixes})
        raise MediaInputError(f"this model reads no {ext or 'suffix-less'} files"
                              + (f" here (it reads: {' '.join(readable)})" if readable else ""))
    spoken = [m for m in owners if plugins[m].text_kind == "transcript"]
    return (spoken or owners)[0]


def spoken_modality(layout: VocabLayout) -> str | None:
    """The layout's audio modality whose paired text is a transcript (speech), or None."""
    for m in layout.modalities:
        plugin = registry.get(m)
        if isinstance(plugin, AudioModality) and plugin.text_kind == "transcript":
            return m
    return None


def no_modality(layout: VocabLayout, modality: str) -> str:
    """The one-line answer for a modality the model lacks."""
    return f"this model has no {modality} modality (it has: {', '.join(layout.modalities) or 'text only'})"


def check_render_options(options: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """``{modality: {option: value}}`` with None values dropped; unknown modalities or options (not in
    the plugin's ``render_options``) raise ``ValueError`` naming them."""
    out: dict[str, dict[str, Any]] = {}
    for m, opts in options.items():
        allowed = registry.get(m).render_options
        for k, v in opts.items():
            if k not in allowed:
                raise ValueError(f"{m} has no render option {k!r}; it has: {', '.join(allowed) or 'none'}")
            if v is not None:
                out.setdefault(m, {})[k] = allowed[k][0](v)
    return out
