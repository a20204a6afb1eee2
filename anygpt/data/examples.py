"""Shard samples -> rendered training examples (ids, loss mask, task tag), or a counted skip.

Samples are read through :mod:`anygpt.data.schema` (the one owner of the sample format); this
module adds what depends on the run: codes are checked against the run's layout (enough codebooks,
every used code inside the modality's range) and rendered with its tokenizer.

Everything here is a pure function of the sample, the source settings, the seed and the epoch:
the direction of a stage-1 pair and its instruction are drawn from a ``random.Random`` seeded by
``(seed, source, epoch, shard name, key)`` (the shard's basename, so moving the data keeps the
draws): it does not matter which process renders a sample or when, and an exact resume needs no
RNG state.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from anygpt import modalities as registry
from anygpt.data.schema import Sample, SampleError, decode_sample
from anygpt.data.shards import shard_name
from anygpt.formats import Conversation, Marker, Media, SequenceFormat, Text, Turn, pretrain_pair
from anygpt.layout import LayoutError, VocabLayout


def task_names() -> tuple[str, ...]:
    """Per-token task names; a name's index is its id in a batch's ``tasks``.

    Append-only like the layout: ``pad``, the founding modalities' ``X2text``/``text2X`` (registry
    order), ``sft``, then every later modality's pair, so the built-in ids never move when a plugin
    is installed.  A modality missing from a run's layout simply leaves its ids unused.
    """
    plugins = registry.registered()
    pairs = {name: (f"{name}2text", f"text2{name}") for name in plugins}
    founding = [t for name, p in plugins.items() if p.founding for t in pairs[name]]
    later = [t for name, p in plugins.items() if not p.founding for t in pairs[name]]
    return ("pad", *founding, "sft", *later)


def task_id(name: str) -> int:
    """The id of a task name (``ValueError`` naming it when no registered modality has it)."""
    names = task_names()
    if name not in names:
        raise ValueError(f"unknown task {name!r} (is the plugin of its modality installed?); known: "
                         f"{', '.join(names)}")
    return names.index(name)


def __getattr__(name: str) -> Any:
    # TASK_NAMES follows the registry (read when asked for, so a plugin registered late is included).
    if name == "TASK_NAMES":
        return task_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def layout_codes(codes: np.ndarray, member: str, layout: VocabLayout, modality: str,
                 codec: str | None = None) -> np.ndarray:
    """The codebooks of a media member's codes (:meth:`Sample.codes`) that the LM sees, checked
    against the run's layout: made with the layout's codec (when both record one; ``codec_mismatch``
    names both: Mimi codes fit a SpeechTokenizer range by value but mean something else), enough
    codebooks, every code inside the modality's range (``bad_codes`` / ``codes_out_of_range``)."""
    m = layout.modality(modality)
    if codec is not None and m.codec is not None and codec != m.codec:
        raise SampleError("codec_mismatch", f"{member}: codes made with {codec}, but this model's {modality} "
                                            f"range is for {m.codec}")
    if codes.shape[0] < m.num_codebooks:
        raise SampleError("bad_codes", f"{member}: {codes.shape[0]} codebooks, {modality} needs {m.num_codebooks}")
    used = codes[: m.num_codebooks]
    if used.min() < 0 or used.max() >= m.codebook_size:
        raise SampleError("codes_out_of_range", f"{member}: codes in [{used.min()}, {used.max()}], "
                                                f"{modality} allows [0, {m.codebook_size})")
    return used


@dataclass
class Example:
    """One rendered example.  ``mask`` marks training targets (before the first-token rule);
    ``task`` is an id of :func:`task_names`."""

    ids: np.ndarray  # int64 [n]
    mask: np.ndarray  # bool [n]
    key: str
    task: int

    def __len__(self) -> int:
        return len(self.ids)

    def to_state(self) -> list:
        """JSON-able form for the packer's carried-over examples in a loader state; the task is saved
        by name, so a state stays valid when a plugin installed later appends task ids."""
        return [self.ids.tolist(), np.flatnonzero(self.mask).tolist(), self.key, task_names()[self.task]]

    @classmethod
    def from_state(cls, s: list) -> "Example":
        """Inverse of :meth:`to_state`; also reads states that saved the task id (built-in ids never move)."""
        ids = np.asarray(s[0], dtype=np.int64)
        mask = np.zeros(len(ids), dtype=bool)
        mask[np.asarray(s[1], dtype=np.int64)] = True
        task = task_id(s[3]) if isinstance(s[3], str) else int(s[3])
        return cls(ids, mask, str(s[2]), task)


@dataclass
class Skip:
    """A sample that could not be used: ``reason`` is a short counter name, ``key`` names it."""

    reason: str
    key: str
    detail: str = ""


@dataclass(frozen=True)
class SourceSpec:
    """What rendering needs to know about a source (picklable, sent to worker processes)."""

    name: str
    kind: Literal["pretrain", "sft"] = "pretrain"
    x2text_prob: float = 0.5


class ExampleBuilder:
    """Decodes and renders shard samples for one tokenizer + layout.

    Args:
        tokenizer, layout: as for :class:`~anygpt.formats.SequenceFormat`.
        seq_len: row length; longer examples are skipped (``overlong="skip"``, counted as
            ``too_long``) or cut to ``seq_len`` tokens (``"truncate"``).
        loss: stage-1 loss (``cfg.data.loss``); SFT sources always use assistant-only loss.
        system_prompt: rendered before conversations that carry no ``system`` of their own.
        seed: run seed (direction and instruction draws).
    """

    def __init__(self, tokenizer: Any, layout: VocabLayout, seq_len: int, loss: str = "all",
                 system_prompt: str | None = None, seed: int = 0, overlong: str = "skip"):
        if overlong not in ("skip", "truncate"):
            raise ValueError(f"overlong must be 'skip' or 'truncate', not {overlong!r}")
        self.tokenizer = tokenizer
        self.layout = layout
        self.seq_len = int(seq_len)
        self.loss = loss
        self.system_prompt = system_prompt
        self.seed = int(seed)
        self.overlong = overlong
        self.fmt = SequenceFormat(tokenizer, layout)
        self.task_names = task_names()
        self.task_ids = {name: i for i, name in enumerate(self.task_names)}

    # ------------------------------------------------------------------ decoding
    def _codes(self, sample: Sample, member: str, modality: str) -> np.ndarray:
        return layout_codes(sample.codes(member), member, self.layout, modality, sample.codec(member))

    def _pair(self, sample: Sample) -> tuple[str, np.ndarray, str]:
        """``(modality, codes, text)`` of a stage-1 pair."""
        modality, member = sample.pair_member(self.layout.modalities)
        return modality, self._codes(sample, member, modality), sample.text

    def _conversation(self, sample: Sample) -> Conversation:
        turns = []
        for role, parts in sample.turns(self.layout.modalities):
            content = []
            for kind, value in parts:
                if kind == "text":
                    content.append(Text(value))
                elif kind == "marker":
                    content.append(Marker(value))
                else:  # a modality: value is its member
                    content.append(Media(kind, self._codes(sample, value, kind)))
            turns.append(Turn(role, content))
        if not any(t.role == "assistant" for t in turns):
            raise SampleError("no_targets", "conversation has no assistant turn")
        system = sample.meta.get("system")
        system = system if isinstance(system, str) else self.system_prompt
        return Conversation(turns, system=system or None)

    # ------------------------------------------------------------------ rendering
    def _finish(self, conv: Conversation, loss: str, key: str, task: str) -> Example:
        try:
            r = self.fmt.render(conv, loss=loss)
        except LayoutError as e:
            raise SampleError("bad_codes", str(e)) from None
        ids, mask = r.ids, r.loss_mask
        if len(ids) > self.seq_len:
            if self.overlong == "skip":
                raise SampleError("too_long", f"{len(ids)} tokens > seq_len {self.seq_len}")
            ids, mask = ids[: self.seq_len], mask[: self.seq_len]
        if not mask[1:].any():
            raise SampleError("no_targets")
        return Example(ids, mask, key, self.task_ids[task])

    @staticmethod
    def _sample_key(raw: dict, source: str) -> str:
        return f"{source}/{shard_name(raw.get('__url__', '?'))}/{raw.get('__key__', '?')}"

    @staticmethod
    def _task(modality: str, direction: str) -> str:
        return f"{modality}2text" if direction == "x2text" else f"text2{modality}"

    def build(self, raw: dict, source: SourceSpec, epoch: int) -> Example | Skip:
        """One training example: a stage-1 pair in a drawn direction, or a conversation."""
        key = self._sample_key(raw, source.name)
        try:
            sample = decode_sample(raw)
            if sample.kind == "conversation":
                return self._finish(self._conversation(sample), "assistant", key, "sft")
            modality, codes, text = self._pair(sample)
            rng = random.Random(f"{self.seed}|{source.name}|{epoch}|{shard_name(raw.get('__url__', '?'))}|"
                                f"{raw.get('__key__')}")
            direction = "x2text" if rng.random() < source.x2text_prob else "text2x"
            conv = pretrain_pair(modality, Media(modality, codes), text, direction, rng)
            if source.kind == "sft" and self.system_prompt:
                conv.system = self.system_prompt
            loss = "assistant" if source.kind == "sft" else self.loss
            return self._finish(conv, loss, key, self._task(modality, direction))
        except SampleError as e:
            return Skip(e.reason, key, e.detail)
        except Exception as e:  # anything unforeseen in one sample must not stop a run; counted, logged
            return Skip("error", key, f"{type(e).__name__}: {e}")

    def build_eval(self, raw: dict, source: str, loss: str = "assistant") -> list[Example] | Skip:
        """Held-out examples: a pair in *both* directions (fixed instruction per key), or a conversation."""
        key = self._sample_key(raw, source)
        try:
            sample = decode_sample(raw)
            if sample.kind == "conversation":
                return [self._finish(self._conversation(sample), "assistant", key, "sft")]
            modality, codes, text = self._pair(sample)
            out = []
            for direction in ("x2text", "text2x"):
                rng = random.Random(f"eval|{direction}|{raw.get('__key__')}")
                conv = pretrain_pair(modality, Media(modality, codes), text, direction, rng)
                out.append(self._finish(conv, loss, f"{key}#{direction}", self._task(modality, direction)))
            return out
        except SampleError as e:
            return Skip(e.reason, key, e.detail)
        except Exception as e:
            return Skip("error", key, f"{type(e).__name__}: {e}")


# ---------------------------------------------------------------------- worker-process entry points
_WORKER_BUILDER: ExampleBuilder | None = None


def _init_worker(builder: ExampleBuilder) -> None:
    global _WORKER_BUILDER
    _WORKER_BUILDER = builder


def _build_chunk(chunk: list[tuple[dict, SourceSpec, int]]) -> list[Example | Skip]:
    assert _WORKER_BUILDER is not None
    return [_WORKER_BUILDER.build(raw, spec, epoch) for raw, spec, epoch in chunk]
