"""The shard format, owned by this one module: what a shard and each of its samples hold.

Used by the writer (``data_pipeline``), the training loader, evaluation, the benchmarks and the
SoundStorm trainer, so the format is described once, here, and checked on read.

Shard (a plain tar, WebDataset-compatible)
------------------------------------------
The first member is ``__shard__`` (no extension; WebDataset skips ``__*__`` members), a JSON object
``{"schema": "anygpt-shard", "version": 1, "samples": N}`` padded with spaces to
:data:`HEADER_BYTES`.  The writer reserves it when it opens the shard and fills in ``N`` when it
closes it, so every reader knows how many samples the shard must yield: a truncated tar, a header
corrupted in the middle of the file (Python's ``tarfile`` then just stops) or a lost member shows up
as a shortfall, counted and logged with the shard's name.  A shard of a newer version is refused,
naming the shard; shards without the member (written by other tools, or before version 1) are read
without the count check.

Sample (``json["format"] == 1``)
--------------------------------
``__key__``
    The input's id with every character outside ``[A-Za-z0-9_-]`` replaced by ``_`` (WebDataset cuts
    keys at the first dot), unique within a shard; the original id is ``json["id"]``.
``json`` (UTF-8 object)
    ``format``: 1; ``id``; ``kind``: ``"pair"`` or ``"conversation"``; ``source``: the reader;
    ``corpus``: recipe name or ``null``; ``media``: ``{npy_member: entry}`` with :func:`media_entry`'s
    fields (``modality``, ``num_codebooks``, ``codebook_size``, ``codec``, ``frames``, ``frame_rate``,
    ``seconds``, ``sample_rate``, ``truncated``, ``origin``, plus what the modality's reader reports,
    e.g. ``width``/``height``); ``durations``: ``{npy_member: seconds}`` for timed media; ``meta``:
    reader/corpus specific values.  Pairs add ``text`` and ``modality``.  Conversations add
    ``conversation``: ``[{"role": "user"|"assistant", "content": [part, ...]}]`` with parts
    ``{"text": str}``, ``{"marker": "<-Ins->"|"<-Res->"}`` or ``{<modality>: npy_member}``, and
    ``system`` (string or ``null``).
``.npy`` members, one per media item
    Pairs: ``<modality>.npy``.  Conversations: ``m{i}.<modality>.npy`` (``i``: index of the item in
    order of appearance).  Integer codes **with the codebook axis** ``[K, T]``, all of the codec's
    codebooks (speech keeps 8 RVQ layers; the LM uses the layout's leading ones), in the smallest
    integer dtype that holds the codebook (:func:`code_dtype`).
"""
from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import numpy as np

SAMPLE_FORMAT = 1
SHARD_SCHEMA = "anygpt-shard"
SHARD_VERSION = 1
HEADER_MEMBER = "__shard__"
HEADER_BYTES = 256
MARKERS = ("<-Ins->", "<-Res->")
_KEY_BAD = re.compile(r"[^A-Za-z0-9_-]")


class SampleError(ValueError):
    """A sample that cannot be used; ``reason`` is a short counter name (``missing_media``, ...)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class ShardFormatError(ValueError):
    """A shard header of an unknown schema or a newer version (the message names the shard)."""


# ------------------------------------------------------------------------------- shard header ---


def header_bytes(samples: int) -> bytes:
    """The ``__shard__`` member's content for a shard of ``samples`` samples (always HEADER_BYTES long)."""
    text = json.dumps({"schema": SHARD_SCHEMA, "version": SHARD_VERSION, "samples": int(samples)})
    return text.encode("utf-8").ljust(HEADER_BYTES)


def read_header(data: bytes, shard: str) -> int:
    """The sample count a ``__shard__`` member declares; :class:`ShardFormatError` naming ``shard``
    when the member is not ours or comes from a newer writer."""
    try:
        head = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ShardFormatError(f"{shard}: unreadable {HEADER_MEMBER} member") from None
    if not isinstance(head, dict) or head.get("schema") != SHARD_SCHEMA or not isinstance(head.get("samples"), int):
        raise ShardFormatError(f"{shard}: {HEADER_MEMBER} member is not an {SHARD_SCHEMA} header")
    if head.get("version") != SHARD_VERSION:
        raise ShardFormatError(f"{shard}: shard format version {head.get('version')!r}, this reader knows "
                               f"{SHARD_VERSION}; upgrade anygpt-trainer to read it")
    return int(head["samples"])


# ------------------------------------------------------------------------------------ writing ---


def sanitize_key(raw: str, limit: int = 160) -> str:
    """A WebDataset-safe key: no dots (they start the extension), no slashes, bounded length."""
    key = _KEY_BAD.sub("_", str(raw))[:limit]
    return key or "_"


def code_dtype(codebook_size: int) -> np.dtype:
    """Smallest signed integer type holding every code (int16 covers codebooks up to 32768)."""
    return np.dtype(np.int16) if codebook_size <= 32768 else np.dtype(np.int32)


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


@dataclass
class MediaItem:
    """One coded media item of a sample.

    Attributes:
        modality: its modality.
        codes: ``[K, T]`` integer codes (all of the codec's codebooks).
        codebook_size, frame_rate, codec: what the codes were made with (the codec's card).
        info: what the modality's reader reported (``seconds``, ``sample_rate``, ``truncated``,
            ``width`` ...); ``origin``: the source path or ``tar:member`` (None for token strings).
    """

    modality: str
    codes: np.ndarray
    codebook_size: int
    frame_rate: float | None = None
    codec: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    origin: str | None = None


def media_entry(item: MediaItem) -> dict[str, Any]:
    """The ``json["media"]`` entry of an item: fixed fields first, then the reader's own ones."""
    codes = np.asarray(item.codes)
    seconds = item.info.get("seconds")
    if seconds is None and item.frame_rate:  # token-string inputs: duration from the frame count
        seconds = round(codes.shape[1] / item.frame_rate, 4)
    entry = {"modality": item.modality, "num_codebooks": int(codes.shape[0]), "codebook_size": int(item.codebook_size),
             "codec": item.codec, "frames": int(codes.shape[1]), "frame_rate": item.frame_rate,
             "seconds": seconds, "sample_rate": item.info.get("sample_rate"),
             "truncated": item.info.get("truncated"), "origin": item.origin}
    entry.update({k: v for k, v in item.info.items() if k not in entry and k != "orig_seconds"})
    return entry


def encode_sample(*, id: str, kind: str, media: list[MediaItem], source: str, corpus: str | None = None,
                  text: str | None = None, conversation: list[dict] | None = None, system: str | None = None,
                  meta: Mapping[str, Any] | None = None) -> tuple[str, list[tuple[str, bytes]], dict[str, Any]]:
    """A sample as ``(key, [(member extension, bytes)], json object)``.

    Pairs name one ``media`` item; in a conversation, a content part ``{"media": i}`` stands for
    ``media[i]`` and is written as ``{<modality>: member}``.
    """
    if kind not in ("pair", "conversation"):
        raise ValueError(f"sample kind must be 'pair' or 'conversation', not {kind!r}")
    names = [f"{m.modality}.npy" if kind == "pair" else f"m{i}.{m.modality}.npy" for i, m in enumerate(media)]
    files = [(name, npy_bytes(np.asarray(m.codes).astype(code_dtype(m.codebook_size)))) for name, m in zip(names, media)]
    entries = {name: media_entry(m) for name, m in zip(names, media)}
    obj: dict[str, Any] = {"format": SAMPLE_FORMAT, "id": id, "kind": kind, "source": source, "corpus": corpus}
    if kind == "pair":
        obj["text"], obj["modality"] = text, media[0].modality
    else:
        obj["conversation"] = [
            {"role": t["role"], "content": [{media[c["media"]].modality: names[c["media"]]} if "media" in c else c
                                            for c in t["content"]]}
            for t in conversation or []]
        obj["system"] = system
    obj["media"] = entries
    obj["durations"] = {name: e["seconds"] for name, e in entries.items() if e["seconds"] is not None}
    obj["meta"] = dict(meta or {})
    data = json.dumps(obj, ensure_ascii=False, sort_keys=True).encode("utf-8")
    return sanitize_key(id), [("json", data), *files], obj


# ------------------------------------------------------------------------------------ reading ---


def decode_codes(data: bytes | None, name: str) -> np.ndarray:
    """A ``.npy`` member -> int64 ``[K, T]`` codes; :class:`SampleError` on anything else."""
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
    return codes.astype(np.int64)


@dataclass
class Sample:
    """One shard sample, its ``json`` parsed; media members are decoded on demand (:meth:`codes`).

    Attributes:
        key, url: the sample's ``__key__`` and the shard it came from.
        meta: the parsed ``json`` object.
        raw: the raw members (extension -> bytes).
    """

    key: str
    url: str
    meta: dict[str, Any]
    raw: dict[str, Any]

    @property
    def kind(self) -> str:
        """``json["kind"]`` says it (format 1); older samples: a ``conversation`` field."""
        kind = self.meta.get("kind")
        return kind if kind in ("pair", "conversation") else ("conversation" if "conversation" in self.meta else "pair")

    @property
    def text(self) -> str:
        text = self.meta.get("text")
        if not isinstance(text, str) or not text.strip():
            raise SampleError("empty_text")
        return text

    def codes(self, member: str) -> np.ndarray:
        """Codes of a media member (``speech.npy``; the ``.npy`` may be left out)."""
        if member not in self.raw and not member.endswith(".npy"):
            member += ".npy"
        return decode_codes(self.raw.get(member), member)

    def codec(self, member: str) -> str | None:
        """The codec card name the member's codes were made with (``json["media"]``), if recorded."""
        entry = (self.meta.get("media") or {}).get(member if member.endswith(".npy") else member + ".npy")
        return entry.get("codec") if isinstance(entry, dict) else None

    def pair_member(self, modalities: Iterable[str]) -> tuple[str, str]:
        """``(modality, member)`` of a pair, among ``modalities`` (the reader's layout)."""
        known = list(modalities)
        modality = self.meta.get("modality")
        if modality is not None:
            if modality not in known:
                raise SampleError("unknown_modality", str(modality))
            return modality, f"{modality}.npy"
        present = [m for m in known if f"{m}.npy" in self.raw]
        if not present:
            raise SampleError("missing_media", "no " + "/".join(f"{m}.npy" for m in known))
        if len(present) > 1:
            raise SampleError("ambiguous_media", f"{present} and no 'modality' in json")
        return present[0], f"{present[0]}.npy"

    def turns(self, modalities: Iterable[str]) -> list[tuple[str, list[tuple[str, Any]]]]:
        """A conversation as ``[(role, [(kind, value)])]``: kind ``text`` (str), ``marker`` (token) or
        a modality name (its member).  Structure errors raise :class:`SampleError`."""
        known = list(modalities)
        turns_in = self.meta.get("conversation")
        if not isinstance(turns_in, list) or not turns_in:
            raise SampleError("bad_conversation", "conversation is not a non-empty list")
        out = []
        for i, t in enumerate(turns_in):
            if not isinstance(t, dict) or t.get("role") not in ("user", "assistant"):
                raise SampleError("bad_conversation", f"turn {i}: needs role user/assistant")
            content = t.get("content", [])
            if isinstance(content, str):
                content = [{"text": content}]
            if not isinstance(content, list):
                raise SampleError("bad_conversation", f"turn {i}: content must be a list")
            parts: list[tuple[str, Any]] = []
            for item in content:
                if isinstance(item, str):
                    parts.append(("text", item))
                elif not isinstance(item, dict):
                    raise SampleError("bad_conversation", f"turn {i}: content item {item!r}")
                elif "text" in item:
                    parts.append(("text", str(item["text"])))
                elif "marker" in item:
                    if item["marker"] not in MARKERS:
                        raise SampleError("bad_conversation", f"turn {i}: unknown marker {item['marker']!r}")
                    parts.append(("marker", item["marker"]))
                elif "media" in item:  # {"media": member, "modality": m}
                    if item.get("modality") not in known:
                        raise SampleError("unknown_modality", f"turn {i}: {item.get('modality')!r}")
                    parts.append((item["modality"], str(item["media"])))
                else:
                    found = [m for m in known if m in item]
                    if not found:
                        raise SampleError("bad_conversation", f"turn {i}: content item with keys {sorted(item)}")
                    parts.append((found[0], str(item[found[0]])))
            out.append((t["role"], parts))
        return out


def decode_sample(raw: dict[str, Any]) -> Sample:
    """Raw members (``__key__``, ``__url__``, extensions -> bytes) -> :class:`Sample`.

    Raises :class:`SampleError`: ``missing_json``, ``bad_json``, or ``unknown_format`` for a sample
    written by a newer writer.
    """
    data = raw.get("json")
    if data is None:
        raise SampleError("missing_json")
    if isinstance(data, dict):
        meta = data
    else:
        try:
            meta = json.loads(data.decode("utf-8") if isinstance(data, bytes) else data)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SampleError("bad_json", str(e)) from None
    if not isinstance(meta, dict):
        raise SampleError("bad_json", "top level is not an object")
    fmt = meta.get("format", SAMPLE_FORMAT)
    if fmt != SAMPLE_FORMAT:
        raise SampleError("unknown_format", f"sample format {fmt!r}, this reader knows {SAMPLE_FORMAT}")
    return Sample(str(raw.get("__key__", "?")), str(raw.get("__url__", "?")), meta, raw)


__all__ = ["SAMPLE_FORMAT", "SHARD_SCHEMA", "SHARD_VERSION", "HEADER_MEMBER", "HEADER_BYTES", "MARKERS",
           "SampleError", "ShardFormatError", "header_bytes", "read_header", "sanitize_key", "code_dtype",
           "npy_bytes", "MediaItem", "media_entry", "encode_sample", "decode_codes", "Sample", "decode_sample"]
