"""Shard samples -> rendered training examples (ids, loss mask, task tag), or a counted skip.

Everything here is a pure function of the sample, the source settings, the seed and the epoch:
the direction of a stage-1 pair and its instruction are drawn from a ``random.Random`` seeded by
``(seed, source, epoch, shard name, key)`` (the shard's basename, so moving the data keeps the
draws): it does not matter which process renders a sample or when, and an exact resume needs no
RNG state.
"""
from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from anygpt.data.shards import shard_name
from anygpt.formats import Conversation, Marker, Media, SequenceFormat, Text, Turn, pretrain_pair
from anygpt.layout import LayoutError, VocabLayout

# Per-token task ids (stable: append new names at the end).
TASK_NAMES: tuple[str, ...] = ("pad", "image2text", "text2image", "speech2text", "text2speech",
                               "music2text", "text2music", "sft")
TASK_ID = {name: i for i, name in enumerate(TASK_NAMES)}
MARKERS = ("<-Ins->", "<-Res->")


@dataclass
class Example:
    """One rendered example.  ``mask`` marks training targets (before the first-token rule)."""

    ids: np.ndarray  # int64 [n]
    mask: np.ndarray  # bool [n]
    key: str
    task: int

    def __len__(self) -> int:
        return len(self.ids)

    def to_state(self) -> list:
        """JSON-able form for the packer's carried-over examples in a loader state."""
        return [self.ids.tolist(), np.flatnonzero(self.mask).tolist(), self.key, self.task]

    @classmethod
    def from_state(cls, s: list) -> "Example":
        ids = np.asarray(s[0], dtype=np.int64)
        mask = np.zeros(len(ids), dtype=bool)
        mask[np.asarray(s[1], dtype=np.int64)] = True
        return cls(ids, mask, str(s[2]), int(s[3]))


@dataclass
class Skip:
    """A sample that could not be used: ``reason`` is a short counter name, ``key`` names it."""

    reason: str
    key: str
    detail: str = ""


def _is_conversation(meta: dict) -> bool:
    """``json["kind"]`` says it (data_pipeline format 1); older samples: a ``conversation`` field."""
    kind = meta.get("kind")
    return kind == "conversation" if kind in ("pair", "conversation") else "conversation" in meta


class SampleError(ValueError):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


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
        self._media_exts = [f"{m}.npy" for m in layout.modalities]

    # ------------------------------------------------------------------ decoding
    @staticmethod
    def _meta(raw: dict) -> dict:
        data = raw.get("json")
        if data is None:
            raise SampleError("missing_json")
        try:
            meta = json.loads(data.decode("utf-8") if isinstance(data, bytes) else data)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SampleError("bad_json", str(e)) from None
        if not isinstance(meta, dict):
            raise SampleError("bad_json", "top level is not an object")
        return meta

    def _codes(self, raw: dict, name: str, modality: str) -> np.ndarray:
        data = raw.get(name)
        if data is None and not name.endswith(".npy"):
            name += ".npy"
            data = raw.get(name)
        if data is None:
            raise SampleError("missing_media", name)
        try:
            codes = np.load(io.BytesIO(data), allow_pickle=False)
        except Exception as e:  # ValueError, EOFError, pickle refusal ...
            raise SampleError("bad_npy", f"{name}: {e}") from None
        if codes.dtype.kind not in "iu":
            raise SampleError("bad_npy", f"{name}: dtype {codes.dtype} is not integer")
        if codes.ndim == 1:
            codes = codes[None]
        if codes.ndim != 2 or codes.shape[1] == 0:
            raise SampleError("bad_codes", f"{name}: shape {codes.shape}, expected [K, T>0]")
        m = self.layout.modality(modality)
        if codes.shape[0] < m.num_codebooks:
            raise SampleError("bad_codes", f"{name}: {codes.shape[0]} codebooks, {modality} needs {m.num_codebooks}")
        used = codes[: m.num_codebooks]
        if used.min() < 0 or used.max() >= m.codebook_size:
            raise SampleError("codes_out_of_range", f"{name}: codes in [{used.min()}, {used.max()}], "
                                                    f"{modality} allows [0, {m.codebook_size})")
        return used.astype(np.int64)

    def _pair_media(self, raw: dict, meta: dict) -> tuple[str, np.ndarray]:
        modality = meta.get("modality")
        if modality is not None:
            if modality not in self.layout.modalities:
                raise SampleError("unknown_modality", str(modality))
            return modality, self._codes(raw, f"{modality}.npy", modality)
        present = [e for e in self._media_exts if e in raw]
        if not present:
            raise SampleError("missing_media", "no " + "/".join(self._media_exts))
        if len(present) > 1:
            raise SampleError("ambiguous_media", f"{present} and no 'modality' in json")
        modality = present[0][: -len(".npy")]
        return modality, self._codes(raw, present[0], modality)

    @staticmethod
    def _text(meta: dict) -> str:
        text = meta.get("text")
        if not isinstance(text, str) or not text.strip():
            raise SampleError("empty_text")
        return text

    def _conversation(self, raw: dict, meta: dict) -> Conversation:
        turns_in = meta.get("conversation")
        if not isinstance(turns_in, list) or not turns_in:
            raise SampleError("bad_conversation", "conversation is not a non-empty list")
        turns = []
        for i, t in enumerate(turns_in):
            if not isinstance(t, dict) or t.get("role") not in ("user", "assistant"):
                raise SampleError("bad_conversation", f"turn {i}: needs role user/assistant")
            content = t.get("content", [])
            if isinstance(content, str):
                content = [{"text": content}]
            if not isinstance(content, list):
                raise SampleError("bad_conversation", f"turn {i}: content must be a list")
            parts = []
            for item in content:
                if isinstance(item, str):
                    parts.append(Text(item))
                elif not isinstance(item, dict):
                    raise SampleError("bad_conversation", f"turn {i}: content item {item!r}")
                elif "text" in item:
                    parts.append(Text(str(item["text"])))
                elif "marker" in item:
                    if item["marker"] not in MARKERS:
                        raise SampleError("bad_conversation", f"turn {i}: unknown marker {item['marker']!r}")
                    parts.append(Marker(item["marker"]))
                elif "media" in item:
                    modality = item.get("modality")
                    if modality not in self.layout.modalities:
                        raise SampleError("unknown_modality", f"turn {i}: {modality!r}")
                    parts.append(Media(modality, self._codes(raw, str(item["media"]), modality)))
                else:
                    found = [m for m in self.layout.modalities if m in item]
                    if not found:
                        raise SampleError("bad_conversation", f"turn {i}: content item with keys {sorted(item)}")
                    parts.append(Media(found[0], self._codes(raw, str(item[found[0]]), found[0])))
            turns.append(Turn(t["role"], parts))
        if not any(t.role == "assistant" for t in turns):
            raise SampleError("no_targets", "conversation has no assistant turn")
        system = meta.get("system") if isinstance(meta.get("system"), str) else self.system_prompt
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
        return Example(ids, mask, key, TASK_ID[task])

    def _sample_key(self, raw: dict, source: str) -> str:
        return f"{source}/{shard_name(raw.get('__url__', '?'))}/{raw.get('__key__', '?')}"

    def build(self, raw: dict, source: SourceSpec, epoch: int) -> Example | Skip:
        """One training example: a stage-1 pair in a drawn direction, or a conversation."""
        key = self._sample_key(raw, source.name)
        try:
            meta = self._meta(raw)
            loss = "assistant" if source.kind == "sft" else self.loss
            if _is_conversation(meta):
                return self._finish(self._conversation(raw, meta), "assistant", key, "sft")
            modality, codes = self._pair_media(raw, meta)
            text = self._text(meta)
            rng = random.Random(f"{self.seed}|{source.name}|{epoch}|{shard_name(raw.get('__url__', '?'))}|"
                                f"{raw.get('__key__')}")
            direction = "x2text" if rng.random() < source.x2text_prob else "text2x"
            conv = pretrain_pair(modality, Media(modality, codes), text, direction, rng)
            if source.kind == "sft" and self.system_prompt:
                conv.system = self.system_prompt
            task = f"{modality}2text" if direction == "x2text" else f"text2{modality}"
            return self._finish(conv, loss, key, task)
        except SampleError as e:
            return Skip(e.reason, key, e.detail)
        except Exception as e:  # anything unforeseen in one sample must not stop a run; counted, logged
            return Skip("error", key, f"{type(e).__name__}: {e}")

    def build_eval(self, raw: dict, source: str, loss: str = "assistant") -> list[Example] | Skip:
        """Held-out examples: a pair in *both* directions (fixed instruction per key), or a conversation."""
        key = self._sample_key(raw, source)
        try:
            meta = self._meta(raw)
            if _is_conversation(meta):
                return [self._finish(self._conversation(raw, meta), "assistant", key, "sft")]
            modality, codes = self._pair_media(raw, meta)
            text = self._text(meta)
            out = []
            for direction in ("x2text", "text2x"):
                rng = random.Random(f"eval|{direction}|{raw.get('__key__')}")
                conv = pretrain_pair(modality, Media(modality, codes), text, direction, rng)
                task = f"{modality}2text" if direction == "x2text" else f"text2{modality}"
                out.append(self._finish(conv, loss, f"{key}#{direction}", task))
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
