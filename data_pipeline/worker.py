"""Turning one chunk of inputs into one committed shard: load, filter, encode in batches, write, commit.

A chunk's output is a pure function of its inputs and the run settings (the batches are the same
windows of ``batch_size`` inputs on every run), so a chunk redone after a crash is identical to the
one an uninterrupted run writes.  Bad inputs never raise out of here: every problem becomes a
:class:`SkipInput` with a reason, counted in the chunk's accounting and listed in its sidecar.
"""
from __future__ import annotations

import io
import json
import math
import os
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np

from anygpt import modalities as registry
from anygpt.data.schema import MediaItem, encode_sample, sanitize_key
from anygpt.formats.anygpt_strings import AnyGPTStringError, conversation_from_anygpt, string_to_codes
from anygpt.formats.segments import Marker, Media, Text
from anygpt.layout import VocabLayout
from anygpt.modalities.media import MediaError
from anygpt.modalities.plugin import CodecError, MediaRejected, ReadOptions
from data_pipeline.options import PreprocessOptions
from data_pipeline.readers import InputItem, MediaRef
from data_pipeline.shards import ChunkWriter, atomic_write_text, sidecar_path

# Test hook: seconds to sleep after each batch window, so a test can kill a run mid-chunk.
DELAY_ENV = "DATA_PIPELINE_TEST_DELAY"


class SkipInput(Exception):
    """An input that cannot become a sample; ``reason`` is one of the documented skip reasons."""

    def __init__(self, reason: str, detail: str, path: Optional[str] = None):
        super().__init__(detail)
        self.reason, self.detail, self.path = reason, " ".join(str(detail).split())[:500], path


@dataclass
class _Loaded:
    """One media item ready for its codec (or already coded, for token-string inputs)."""

    modality: str
    obj: Any = None
    info: dict = field(default_factory=dict)
    codes: Optional[np.ndarray] = None
    codebook_size: Optional[int] = None
    num_codebooks: Optional[int] = None
    frame_rate: Optional[float] = None
    codec: Optional[str] = None


@dataclass
class _Prepared:
    item: InputItem
    kind: str
    text: Optional[str] = None
    modality: Optional[str] = None
    conversation: Optional[list[dict]] = None
    system: Optional[str] = None
    media: list[_Loaded] = field(default_factory=list)
    skip: Optional[SkipInput] = None
    index: int = -1


class ChunkProcessor:
    """Processes chunks for one worker; codecs are loaded lazily, once, on first use.

    Args:
        opts: the validated run settings.
        codecs: a mapping of already-built codecs by modality (tests, in-process use).  It is used
            as the codec cache: a missing modality is loaded from ``opts.codecs`` (or built tiny with
            ``opts.tiny``) on first use and stored into it, so callers can share it between runs.
            A given codec must be the one the run's card names.
        device: torch device for the codecs (``cpu``, ``cuda:0`` ...).
    """

    def __init__(self, opts: PreprocessOptions, codecs: Optional[dict] = None, device: str = "cpu"):
        self.opts = opts
        self.device = device
        self._codecs: dict[str, Any] = codecs if codecs is not None else {}
        self.cards = opts.run_cards()
        # The run's codecs fix each modality's codebooks, sizes and span length (the ids' offsets
        # do not matter here); token strings are parsed with these ranges, codes checked against them.
        self.layout = VocabLayout.default(32000, cards=self.cards)
        f = opts.filters
        self._drop = [re.compile(p) for p in f.drop_text_matching]
        self.source = opts.source
        self.delay = float(os.environ.get(DELAY_ENV, "0") or 0)

    # ------------------------------------------------------------------ codecs
    def codec(self, modality: str) -> Any:
        """The run's codec of ``modality`` (built from the registry on first use)."""
        name = self.cards[modality]["name"]
        if modality not in self._codecs:
            src = registry.codec_dir(self.opts.codecs, modality) if self.opts.codecs else "tiny"
            codec = registry.build_codec(modality, src, codec=name)
            codec.eval()
            if self.device != "cpu":
                codec.to(self.device)
            self._codecs[modality] = codec
        codec = self._codecs[modality]
        if codec.card.get("name") != name:
            raise CodecError(f"{modality}: the codec given is {codec.card.get('name')!r}, this run's is {name!r}")
        return codec

    # ------------------------------------------------------------------ text
    def norm_text(self, text: Optional[str]) -> str:
        t = self.opts.text
        s = "" if text is None else str(text)
        for a, b in t.replace.items():
            s = s.replace(a, b)
        if t.collapse_whitespace:
            s = " ".join(s.split())
        elif t.strip:
            s = s.strip()
        if t.lowercase:
            s = s.lower()
        return s

    def check_text(self, text: str, raw: Optional[str] = None) -> None:
        """Filters on a normalised text; ``drop_text_matching`` looks at the text as read (``raw``)."""
        f = self.opts.filters
        self.check_dropped(text if raw is None else raw)
        if not text:
            raise SkipInput("empty_text", "text is empty")
        if len(text) < f.min_text_chars:
            raise SkipInput("text_too_short", f"text has {len(text)} characters < {f.min_text_chars}")
        if f.max_text_chars is not None and len(text) > f.max_text_chars:
            raise SkipInput("text_too_long", f"text has {len(text)} characters > {f.max_text_chars}")

    def check_dropped(self, raw: Optional[str]) -> None:
        for pat in self._drop:
            if raw and pat.search(raw):
                raise SkipInput("text_filtered", f"text matches {pat.pattern!r}")

    def check_meta(self, meta: dict) -> None:
        f = self.opts.filters
        for bounds, op, word in ((f.min_meta, lambda v, b: v >= b, ">="), (f.max_meta, lambda v, b: v <= b, "<=")):
            for k, b in bounds.items():
                v = meta.get(k)
                if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or not op(v, b):
                    raise SkipInput("meta_filtered", f"meta {k}={v!r} is not {word} {b}")

    # ------------------------------------------------------------------ media loading
    def _source(self, ref: MediaRef) -> Any:
        if ref.member is None:
            if not os.path.isfile(ref.path):
                raise SkipInput("missing_file", f"{ref.path}: no such file", ref.path)
            if os.path.getsize(ref.path) == 0:
                raise SkipInput("unreadable_media", f"{ref.path}: empty file (0 bytes)", ref.path)
            return ref.path
        try:
            with open(ref.path, "rb") as fh:
                fh.seek(ref.offset)
                data = fh.read(ref.size)
        except OSError as e:
            raise SkipInput("unreadable_archive", f"{ref.origin}: {e}", ref.origin) from None
        if len(data) != ref.size:
            raise SkipInput("unreadable_media", f"{ref.origin}: truncated member ({len(data)} of {ref.size} bytes)",
                            ref.origin)
        buf = io.BytesIO(data)
        buf.name = ref.origin
        return buf

    def read_options(self, ref: MediaRef) -> ReadOptions:
        """The filters (this modality's duration limits, the image bounds) and the segment of ``ref``."""
        f = self.opts.filters
        lim = f.limits(ref.modality)
        return ReadOptions(start=ref.start, end=ref.end, min_seconds=lim.min_seconds, max_seconds=lim.max_seconds,
                           clip_seconds=lim.clip_seconds, min_side=f.min_image_side,
                           max_aspect_ratio=f.max_aspect_ratio)

    def load(self, ref: MediaRef) -> _Loaded:
        """Read one media item through its modality plugin; a rejection or bad file skips the input."""
        src = self._source(ref)
        try:
            obj, info = registry.get(ref.modality).read(src, self.codec(ref.modality), self.read_options(ref))
        except MediaRejected as e:
            raise SkipInput(e.reason, str(e), ref.origin) from None
        except MediaError as e:
            raise SkipInput("unreadable_media", str(e), ref.origin) from None
        return _Loaded(ref.modality, obj, info)

    # ------------------------------------------------------------------ per-input preparation
    def prepare(self, item: InputItem) -> _Prepared:
        """Filter and load one input; raises :class:`SkipInput`."""
        if item.error is not None:
            reason, detail = item.error
            raise SkipInput(reason, detail, item.origin)
        if item.kind == "anygpt":
            return self._prepare_anygpt(item)
        self.check_meta(item.meta)
        if item.kind == "pair":
            text = self.norm_text(item.text)
            self.check_text(text, item.text)
            if not item.media:
                raise SkipInput("no_media", "input has no media", item.origin)
            return _Prepared(item, "pair", text=text, modality=item.modality, media=[self.load(item.media[0])])
        turns = []
        for t in item.conversation or []:
            content = []
            for p in t["content"]:
                if "text" in p:
                    self.check_dropped(p["text"])
                    s = self.norm_text(p["text"])
                    if s:
                        content.append({"text": s})
                else:
                    content.append(dict(p))
            if not content:
                raise SkipInput("empty_text", f"a {t['role']} turn is empty after text normalisation", item.origin)
            turns.append({"role": t["role"], "content": content})
        media = [self.load(ref) for ref in item.media]
        return _Prepared(item, "conversation", conversation=turns,
                         system=self.norm_text(item.system) if item.system else None, media=media)

    def _prepare_anygpt(self, item: InputItem) -> _Prepared:
        rec = item.record or {}
        self.check_meta(item.meta)

        def coded(modality: str, codes: np.ndarray) -> _Loaded:
            spec = self.layout.modality(modality)  # token strings carry only the LM's codebooks
            rate = self.cards[modality].get("frame_rate")
            return _Loaded(modality, None, {}, np.asarray(codes, dtype=np.int64), spec.codebook_size,
                           spec.num_codebooks, float(rate) if rate else None, spec.codec)

        def fail(e: Exception) -> SkipInput:
            msg = str(e)
            reason = "codes_out_of_range" if ("outside" in msg or "out of range" in msg) else "bad_token_string"
            return SkipInput(reason, msg, item.origin)

        if "conversation" in rec:
            try:
                conv = conversation_from_anygpt(self.layout, rec)
            except (AnyGPTStringError, ValueError) as e:
                raise fail(e) from None
            media: list[_Loaded] = []
            turns = []
            for t in conv.turns:
                content = []
                for p in t.parts:
                    if isinstance(p, Text):
                        content.append({"text": p.text})
                    elif isinstance(p, Marker):
                        content.append({"marker": p.token})
                    elif isinstance(p, Media):
                        media.append(coded(p.modality, p.codes))
                        content.append({"media": len(media) - 1})
                if not content:
                    raise SkipInput("empty_text", f"a {t.role} turn is empty", item.origin)
                turns.append({"role": t.role, "content": content})
            system = rec.get("system") if isinstance(rec.get("system"), str) else None
            return _Prepared(item, "conversation", conversation=turns, system=system, media=media)
        starts = tuple(spec.start for spec in self.layout.modalities.values())
        spans = [(k, v) for k, v in rec.items()
                 if k in self.layout.modalities and isinstance(v, str) and v.strip().startswith(starts)]
        if not spans:
            raise SkipInput("no_media", f"record has neither a conversation nor a {'/'.join(self.layout.modalities)} "
                                        "token string", item.origin)
        key, value = spans[0]
        try:
            modality, codes = string_to_codes(self.layout, value)
        except (AnyGPTStringError, ValueError) as e:
            raise fail(e) from None
        if modality != key:
            raise SkipInput("bad_token_string", f"field {key!r} holds a {modality} span", item.origin)
        text = self.norm_text(rec.get("text"))
        self.check_text(text, rec.get("text") if isinstance(rec.get("text"), str) else None)
        return _Prepared(item, "pair", text=text, modality=modality, media=[coded(modality, codes)])

    # ------------------------------------------------------------------ encoding
    def encode(self, prepared: list[_Prepared]) -> None:
        """Encode every pending media item of a window, batched per modality; failures skip their input."""
        import torch  # only runs that encode media need it (token-string runs do not)

        bs = self.opts.batch_size
        jobs: dict[str, list[tuple[_Prepared, _Loaded]]] = {}
        for p in prepared:
            for m in p.media:
                if m.codes is None:
                    jobs.setdefault(m.modality, []).append((p, m))
        for modality, items in jobs.items():
            codec = self.codec(modality)
            card = self.cards[modality]
            for i in range(0, len(items), bs):
                batch = [(p, m) for p, m in items[i : i + bs] if p.skip is None]
                if not batch:
                    continue
                try:
                    with torch.inference_mode():
                        out = codec.encode([m.obj for _, m in batch])
                    if len(out) != len(batch):
                        raise RuntimeError(f"codec returned {len(out)} results for {len(batch)} inputs")
                except Exception:
                    # Isolate the culprit: encode one by one so one bad item does not sink its batch.
                    out = []
                    for p, m in batch:
                        try:
                            with torch.inference_mode():
                                out.append(codec.encode([m.obj])[0])
                        except Exception as e:
                            p.skip = SkipInput("encode_error", f"{modality} codec: {type(e).__name__}: {e}",
                                               p.item.origin)
                            out.append(None)
                for (p, m), codes in zip(batch, out):
                    if codes is not None:
                        m.codes = np.asarray(codes.detach().cpu().numpy() if hasattr(codes, "detach") else codes)
                        m.codebook_size, m.num_codebooks = int(codec.codebook_size), int(codec.num_codebooks)
                        m.frame_rate = float(card["frame_rate"]) if card.get("frame_rate") else None
                        m.codec = card["name"]
                    m.obj = None  # free the decoded media early

    def check_codes(self, p: _Prepared) -> None:
        """Codes must fit the run's codec: ``[K, T]`` integers, inside the codebook, the card's span length."""
        for m in p.media:
            c = m.codes
            if c is None:
                raise SkipInput("encode_error", f"{m.modality}: no codes", p.item.origin)
            if not np.issubdtype(c.dtype, np.integer) or c.ndim != 2 or c.shape[0] != m.num_codebooks or c.shape[1] < 1:
                raise SkipInput("bad_code_shape", f"{m.modality}: codes {c.dtype} {tuple(c.shape)}, expected "
                                                  f"[{m.num_codebooks}, T>=1] integers", p.item.origin)
            span = self.layout.modality(m.modality).span_length
            if span is not None and c.shape[1] != span:
                raise SkipInput("bad_code_shape", f"{m.modality}: {c.shape[1]} codes, expected exactly {span}",
                                p.item.origin)
            lo, hi = int(c.min()), int(c.max())
            if lo < 0 or hi >= m.codebook_size:
                raise SkipInput("codes_out_of_range", f"{m.modality}: codes span [{lo}, {hi}], codebook has "
                                                      f"{m.codebook_size}", p.item.origin)

    # ------------------------------------------------------------------ samples
    def build_sample(self, p: _Prepared) -> tuple[str, list[tuple[str, bytes]], dict]:
        """``(key, members, json object)`` of a prepared and encoded input (:func:`encode_sample`)."""
        item = p.item
        media = [MediaItem(m.modality, m.codes, m.codebook_size, m.frame_rate, m.codec, m.info,
                           item.media[i].origin if i < len(item.media) else None)
                 for i, m in enumerate(p.media)]
        return encode_sample(id=item.id, kind=p.kind, media=media, source=self.source, corpus=self.opts.corpus,
                             text=p.text, conversation=p.conversation, system=p.system, meta=item.meta)

    # ------------------------------------------------------------------ a whole chunk
    def process_chunk(self, chunk: int, first_index: int, items: list[InputItem],
                      progress: Optional[Callable[[int, int], None]] = None) -> dict:
        """Write chunk ``chunk`` (inputs ``first_index ...``) and commit its sidecar; returns the sidecar.

        The sidecar's ``timings`` say where the chunk's time went: ``read_s`` (filters and the
        modality plugins' reads: media decode and resampling), ``encode_s`` (the batched codec
        calls), ``write_s`` (code checks, sample building, tar writing and closing), plus the
        ``started``/``ended`` wall-clock times.  They are the only part of a sidecar that differs
        between two runs; the shards never do.
        """
        opts = self.opts
        t0 = time.time()
        clock = time.perf_counter
        # Cheap per-phase timers (a few perf_counter calls per window): where a chunk's time goes.
        spent = {"read_s": 0.0, "encode_s": 0.0, "write_s": 0.0}
        writer = ChunkWriter(opts.out, opts.prefix, chunk, opts.shard_bytes)
        acc = _Accounting(self.layout)
        seen: set[str] = set()
        try:
            for w0 in range(0, len(items), opts.batch_size):
                window = items[w0 : w0 + opts.batch_size]
                prepared: list[_Prepared] = []
                t = clock()
                for j, item in enumerate(window):
                    idx = first_index + w0 + j
                    try:
                        prepared.append(self.prepare(item))
                    except SkipInput as e:
                        acc.skip(idx, chunk, item, e, self.source, opts.corpus)
                    except CodecError:
                        raise  # a codec that cannot be built is a setup error, not a bad input
                    except Exception as e:  # an unforeseen decoder failure on one input must not stop the run
                        acc.skip(idx, chunk, item, SkipInput("unreadable_media", f"{type(e).__name__}: {e}"),
                                 self.source, opts.corpus)
                    else:
                        prepared[-1].index = idx
                t, spent["read_s"] = clock(), spent["read_s"] + clock() - t
                self.encode(prepared)
                t, spent["encode_s"] = clock(), spent["encode_s"] + clock() - t
                written = 0
                for p in prepared:
                    idx = p.index
                    try:
                        if p.skip is not None:
                            raise p.skip
                        self.check_codes(p)
                        key = sanitize_key(p.item.id)
                        if key in seen:
                            raise SkipInput("duplicate_id", f"id {p.item.id!r} repeats within the chunk", p.item.origin)
                        key, files, obj = self.build_sample(p)
                    except SkipInput as e:
                        acc.skip(idx, chunk, p.item, e, self.source, opts.corpus)
                        continue
                    seen.add(key)
                    size = writer.add(key, files)
                    acc.write(obj["media"], size)
                    written += 1
                spent["write_s"] += clock() - t
                if progress is not None:
                    progress(len(window), written)
                if self.delay:
                    time.sleep(self.delay)
            t = clock()
            parts = writer.close()
            spent["write_s"] += clock() - t
        except BaseException:
            writer.abort()
            raise
        t1 = time.time()
        rec = {"format": 1, "chunk": chunk, "prefix": opts.prefix, "first_input": first_index,
               "parts": parts, **acc.to_dict(), "elapsed_s": round(t1 - t0, 3),
               "timings": {"started": round(t0, 3), "ended": round(t1, 3),
                           **{k: round(v, 4) for k, v in spent.items()}}}
        # The sidecar is the commit point: written last, atomically.
        atomic_write_text(sidecar_path(opts.out, opts.prefix, chunk), json.dumps(rec, ensure_ascii=False) + "\n")
        return rec


class _Accounting:
    """A chunk's counts: inputs, skips by reason, LM tokens / stored codes / items / seconds per modality."""

    def __init__(self, layout: VocabLayout):
        self.layout = layout
        self.inputs = self.written = self.skipped = self.bytes = 0
        self.reasons: Counter = Counter()
        self.tokens: Counter = Counter()
        self.codes: Counter = Counter()
        self.media: Counter = Counter()
        self.audio_seconds: Counter = Counter()
        self.errors: list[dict] = []

    def skip(self, index: int, chunk: int, item: InputItem, e: SkipInput, source: str, corpus: Optional[str]) -> None:
        self.inputs += 1
        self.skipped += 1
        self.reasons[e.reason] += 1
        self.errors.append({"source": source, "corpus": corpus, "index": index, "key": item.id,
                            "path": e.path or item.origin, "reason": e.reason, "detail": e.detail, "chunk": chunk})

    def write(self, media_json: dict, size: int) -> None:
        self.inputs += 1
        self.written += 1
        self.bytes += size
        for m in media_json.values():
            mod = m["modality"]
            k_lm = self.layout.modality(mod).num_codebooks  # the run card's lm_codebooks
            self.tokens[mod] += min(k_lm, m["num_codebooks"]) * m["frames"]
            self.codes[mod] += m["num_codebooks"] * m["frames"]
            self.media[mod] += 1
            if m["seconds"] is not None:
                self.audio_seconds[mod] += m["seconds"]

    def to_dict(self) -> dict:
        return {"inputs": self.inputs, "written": self.written, "skipped": self.skipped,
                "skipped_by_reason": dict(sorted(self.reasons.items())), "tokens": dict(self.tokens),
                "codes": dict(self.codes), "media": dict(self.media),
                "audio_seconds": {k: round(v, 4) for k, v in self.audio_seconds.items()},
                "bytes": self.bytes, "errors": self.errors}


__all__ = ["ChunkProcessor", "SkipInput", "DELAY_ENV"]
