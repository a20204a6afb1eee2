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
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from anygpt.modalities.base import CodecError
from data_pipeline.options import AUDIO_MODALITIES, PreprocessOptions
from data_pipeline.readers import InputItem, MediaRef
from anygpt.data.schema import code_dtype, npy_bytes, sanitize_key
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


def _layout():
    from anygpt.layout import VocabLayout

    return VocabLayout.default(32000)  # only the modality specs matter here: offsets are irrelevant


class ChunkProcessor:
    """Processes chunks for one worker; codecs are loaded lazily, once, on first use.

    Args:
        opts: the validated run settings.
        codecs: a mapping of already-built codecs by modality (tests, in-process use).  It is used
            as the codec cache: a missing modality is loaded from ``opts.codecs`` (or built tiny with
            ``opts.tiny``) on first use and stored into it, so callers can share it between runs.
        device: torch device for the codecs (``cpu``, ``cuda:0`` ...).
    """

    def __init__(self, opts: PreprocessOptions, codecs: Optional[dict] = None, device: str = "cpu"):
        self.opts = opts
        self.device = device
        self._codecs: dict[str, Any] = codecs if codecs is not None else {}
        self.layout = _layout()
        f = opts.filters
        self._drop = [re.compile(p) for p in f.drop_text_matching]
        self.source = opts.source
        self.delay = float(os.environ.get(DELAY_ENV, "0") or 0)

    # ------------------------------------------------------------------ codecs
    def codec(self, modality: str):
        if modality not in self._codecs:
            from anygpt.modalities import build_codec

            src = "tiny" if self.opts.tiny or not self.opts.codecs else Path(self.opts.codecs) / modality
            codec = build_codec(modality, src)
            codec.eval()
            if self.device != "cpu":
                codec.to(self.device)
            self._codecs[modality] = codec
        return self._codecs[modality]

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

    def load(self, ref: MediaRef) -> _Loaded:
        from anygpt.modalities.media import MediaError

        src = self._source(ref)
        try:
            if ref.modality in AUDIO_MODALITIES:
                return self._load_audio(ref, src)
            return self._load_image(ref, src)
        except MediaError as e:
            raise SkipInput("unreadable_media", str(e), ref.origin) from None

    def _load_audio(self, ref: MediaRef, src: Any) -> _Loaded:
        import soundfile as sf

        from anygpt.modalities import media

        lim = self.opts.filters.limits(ref.modality)
        sr = int(self.codec(ref.modality).sample_rate)
        try:
            with sf.SoundFile(src) as f:
                file_sr, frames = int(f.samplerate), int(f.frames)
        except Exception as e:  # libsndfile raises several types for corrupt data
            raise SkipInput("unreadable_media", f"{ref.origin}: cannot read audio ({' '.join(str(e).split())})",
                            ref.origin) from None
        if hasattr(src, "seek"):
            src.seek(0)
        file_seconds = frames / float(file_sr) if file_sr > 0 else 0.0
        start = ref.start or 0.0
        end = ref.end if ref.end is not None else file_seconds
        if start < 0 or end <= start or start >= file_seconds:
            raise SkipInput("bad_record", f"{ref.origin}: segment [{start}, {end}] outside the file's {file_seconds:.2f} s",
                            ref.origin)
        end = min(end, file_seconds)
        seconds = end - start
        if lim.min_seconds is not None and seconds < lim.min_seconds:
            raise SkipInput("too_short", f"{ref.origin}: {seconds:.2f} s < min_seconds {lim.min_seconds}", ref.origin)
        if lim.max_seconds is not None and seconds > lim.max_seconds:
            raise SkipInput("too_long", f"{ref.origin}: {seconds:.2f} s > max_seconds {lim.max_seconds}", ref.origin)
        if ref.start is None and ref.end is None:
            wav, info = media.load_audio(src, sr, max_seconds=lim.clip_seconds)
            truncated = info.truncated
        else:
            # A segment of a longer file: read only its frames, then the shared mono/resample/clip steps.
            try:
                with sf.SoundFile(src) as f:
                    f.seek(int(round(start * file_sr)))
                    data = f.read(int(round(seconds * file_sr)), dtype="float32", always_2d=True)
            except Exception as e:
                raise SkipInput("unreadable_media", f"{ref.origin}: cannot read audio ({' '.join(str(e).split())})",
                                ref.origin) from None
            if data.shape[0] == 0 or not np.isfinite(data).all():
                raise SkipInput("unreadable_media", f"{ref.origin}: empty or non-finite audio segment", ref.origin)
            wav = media.resample(media.to_mono(data), file_sr, sr)
            wav, truncated = media.clip_audio(wav, sr, lim.clip_seconds)
            if wav.shape[0] == 0:
                raise SkipInput("unreadable_media", f"{ref.origin}: zero-length audio after resampling", ref.origin)
        info = {"seconds": round(wav.shape[0] / float(sr), 4), "sample_rate": sr, "truncated": bool(truncated),
                "orig_seconds": round(seconds, 4)}
        return _Loaded(ref.modality, np.ascontiguousarray(wav, dtype=np.float32), info)

    def _load_image(self, ref: MediaRef, src: Any) -> _Loaded:
        from anygpt.modalities import media

        img = media.load_image(src, name=ref.origin)
        f = self.opts.filters
        w, h = img.size
        if f.min_image_side is not None and min(w, h) < f.min_image_side:
            raise SkipInput("image_too_small", f"{ref.origin}: {w}x{h} < min_image_side {f.min_image_side}", ref.origin)
        if f.max_aspect_ratio is not None and max(w, h) / min(w, h) > f.max_aspect_ratio:
            raise SkipInput("bad_aspect_ratio", f"{ref.origin}: aspect {max(w, h) / min(w, h):.2f} > {f.max_aspect_ratio}",
                            ref.origin)
        return _Loaded("image", img, {"width": w, "height": h})

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
        from anygpt.formats.anygpt_strings import AnyGPTStringError, conversation_from_anygpt, string_to_codes
        from anygpt.formats.segments import Marker, Media, Text

        rec = item.record or {}
        self.check_meta(item.meta)

        def coded(modality: str, codes: np.ndarray) -> _Loaded:
            spec = self.layout.modality(modality)
            # AnyGPT's codecs run at 50 frames/s for speech and music; images have no frame rate.
            rate = 50.0 if modality in AUDIO_MODALITIES else None
            return _Loaded(modality, None, {}, np.asarray(codes, dtype=np.int64), spec.codebook_size,
                           spec.num_codebooks, rate)

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
        spans = [(k, v) for k, v in rec.items()
                 if k in self.layout.modalities and isinstance(v, str) and v.strip().startswith("<so")]
        if not spans:
            raise SkipInput("no_media", "record has neither a conversation nor an image/speech/music token string",
                            item.origin)
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
        import torch

        bs = self.opts.batch_size
        jobs: dict[str, list[tuple[_Prepared, _Loaded]]] = {}
        for p in prepared:
            for m in p.media:
                if m.codes is None:
                    jobs.setdefault(m.modality, []).append((p, m))
        for modality, items in jobs.items():
            codec = self.codec(modality)
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
                        m.frame_rate = float(codec.frame_rate) if codec.frame_rate else None
                    m.obj = None  # free the waveform / image early

    def check_codes(self, p: _Prepared) -> None:
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
    def build_sample(self, p: _Prepared) -> tuple[dict, list[tuple[str, bytes]], dict]:
        """(json object, npy files, per-media accounting) for a prepared and encoded input."""
        item = p.item
        files: list[tuple[str, bytes]] = []
        media_json: dict[str, dict] = {}
        durations: dict[str, float] = {}
        keys = []
        for i, m in enumerate(p.media):
            key = f"{m.modality}.npy" if p.kind == "pair" else f"m{i}.{m.modality}.npy"
            keys.append(key)
            arr = m.codes.astype(code_dtype(m.codebook_size))
            files.append((key, npy_bytes(arr)))
            audio = m.modality in AUDIO_MODALITIES
            seconds = m.info.get("seconds")
            if audio and seconds is None and m.frame_rate:  # token-string input: duration from frames
                seconds = round(arr.shape[1] / m.frame_rate, 4)
            media_json[key] = {
                "modality": m.modality,
                "num_codebooks": int(arr.shape[0]),
                "codebook_size": int(m.codebook_size),
                "frames": int(arr.shape[1]),
                "frame_rate": m.frame_rate,
                "seconds": seconds if audio else None,
                "sample_rate": m.info.get("sample_rate") if audio else None,
                "truncated": m.info.get("truncated") if audio else None,
                "origin": item.media[i].origin if i < len(item.media) else None,
            }
            if m.modality == "image" and "width" in m.info:
                media_json[key]["width"], media_json[key]["height"] = m.info["width"], m.info["height"]
            if audio and seconds is not None:
                durations[key] = seconds
        obj: dict[str, Any] = {"format": 1, "id": item.id, "kind": p.kind, "source": self.source,
                               "corpus": self.opts.corpus}
        if p.kind == "pair":
            obj["text"], obj["modality"] = p.text, p.modality
        else:
            obj["conversation"] = [
                {"role": t["role"], "content": [
                    {p.media[c["media"]].modality: keys[c["media"]]} if "media" in c else c for c in t["content"]]}
                for t in p.conversation]
            obj["system"] = p.system
        obj["media"], obj["durations"], obj["meta"] = media_json, durations, item.meta
        return obj, files, media_json

    # ------------------------------------------------------------------ a whole chunk
    def process_chunk(self, chunk: int, first_index: int, items: list[InputItem],
                      progress: Optional[Callable[[int, int], None]] = None) -> dict:
        """Write chunk ``chunk`` (inputs ``first_index ...``) and commit its sidecar; returns the sidecar."""
        opts = self.opts
        t0 = time.time()
        writer = ChunkWriter(opts.out, opts.prefix, chunk, opts.shard_bytes)
        acc = _Accounting(self.layout)
        seen: set[str] = set()
        try:
            for w0 in range(0, len(items), opts.batch_size):
                window = items[w0 : w0 + opts.batch_size]
                prepared: list[_Prepared] = []
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
                self.encode(prepared)
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
                        obj, files, media_json = self.build_sample(p)
                    except SkipInput as e:
                        acc.skip(idx, chunk, p.item, e, self.source, opts.corpus)
                        continue
                    seen.add(key)
                    data = json.dumps(obj, ensure_ascii=False, sort_keys=True).encode("utf-8")
                    size = writer.add(key, [("json", data), *files])
                    acc.write(media_json, size)
                    written += 1
                if progress is not None:
                    progress(len(window), written)
                if self.delay:
                    time.sleep(self.delay)
            parts = writer.close()
        except BaseException:
            writer.abort()
            raise
        rec = {"format": 1, "chunk": chunk, "prefix": opts.prefix, "first_input": first_index,
               "parts": parts, **acc.to_dict(), "elapsed_s": round(time.time() - t0, 3)}
        # The sidecar is the commit point: written last, atomically.
        atomic_write_text(sidecar_path(opts.out, opts.prefix, chunk), json.dumps(rec, ensure_ascii=False) + "\n")
        return rec


class _Accounting:
    def __init__(self, layout):
        self.layout = layout
        self.inputs = self.written = self.skipped = self.bytes = self.images = 0
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
            k_lm = self.layout.modality(mod).num_codebooks
            self.tokens[mod] += min(k_lm, m["num_codebooks"]) * m["frames"]
            self.codes[mod] += m["num_codebooks"] * m["frames"]
            self.media[mod] += 1
            if m["seconds"] is not None:
                self.audio_seconds[mod] += m["seconds"]
            if mod == "image":
                self.images += 1

    def to_dict(self) -> dict:
        return {"inputs": self.inputs, "written": self.written, "skipped": self.skipped,
                "skipped_by_reason": dict(sorted(self.reasons.items())), "tokens": dict(self.tokens),
                "codes": dict(self.codes), "media": dict(self.media),
                "audio_seconds": {k: round(v, 4) for k, v in self.audio_seconds.items()},
                "images": self.images, "bytes": self.bytes, "errors": self.errors}


__all__ = ["ChunkProcessor", "SkipInput", "DELAY_ENV"]
