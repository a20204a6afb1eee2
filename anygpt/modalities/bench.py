"""``anygpt bench codecs``: encode/decode speed of every codec (each card of the registry's
modalities), tiny and real-size, at batch 1 and 8.

Real-size codecs are the released architectures with random weights: speed does not depend on the
weight values, so this runs without any download.  Audio numbers are seconds of audio processed per
wall-clock second (``x real time``; > 1 is faster than real time), the real-time factor (``rtf`` =
compute seconds / audio seconds) and the LM positions one second of audio costs (frame rate x the
codebooks the LM sees); images are images per second.  Real-size image codecs are opt-in
(``real_image=True``): the 1.1 B-parameter SEED ViT-g takes minutes on a 2-core CPU.
"""
from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch


def _timed(fn: Callable[[], Any], repeat: int) -> float:
    fn()  # warm-up: first calls pay one-off costs (kernel selection, LSTM weight packing)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _audio_rows(codec: Any, size: str, seconds: float, batches: tuple[int, ...], repeat: int) -> list[dict]:
    rng = np.random.default_rng(0)
    n = int(seconds * codec.sample_rate)
    rows = []
    for b in batches:
        wavs = [(0.1 * rng.standard_normal(n)).astype(np.float32) for _ in range(b)]
        codes = codec.encode(wavs)
        enc = _timed(lambda: codec.encode(wavs), repeat)
        dec = _timed(lambda: codec.decode(codes), repeat)
        media = seconds * b
        rows.append({
            "codec": codec.card["name"], "modality": codec.modality, "size": size, "batch": b,
            "params_m": round(sum(p.numel() for p in codec.parameters()) / 1e6, 2),
            "media": f"{seconds:g}s audio",
            "codes": list(codes[0].shape),
            "encode_s": round(enc, 4), "decode_s": round(dec, 4),
            "encode_x_realtime": round(media / enc, 2), "decode_x_realtime": round(media / dec, 2),
            "encode_rtf": round(enc / media, 4), "decode_rtf": round(dec / media, 4),
            "lm_positions_per_s": round(float(codec.frame_rate) * codec.lm_codebooks, 2),
        })
    return rows


def _image_rows(codec: Any, size: str, batches: tuple[int, ...], repeat: int) -> list[dict]:
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = []
    for b in batches:
        imgs = [Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)) for _ in range(b)]
        codes = codec.encode(imgs)
        enc = _timed(lambda: codec.encode(imgs), repeat)
        emb = _timed(lambda: codec.codes_to_embedding(codes), repeat)
        rows.append({
            "codec": codec.card["name"], "modality": codec.modality, "size": size, "batch": b,
            "params_m": round(sum(p.numel() for p in codec.parameters()) / 1e6, 2),
            "media": "256px image", "codes": list(codes[0].shape),
            "encode_s": round(enc, 4), "decode_s": round(emb, 4),
            "encode_images_per_s": round(b / enc, 2), "codes_to_embedding_per_s": round(b / emb, 2),
        })
    return rows


def format_table(rows: list[dict]) -> str:
    head = f"{'codec':16} {'size':5} {'batch':>5} {'params':>8} {'encode':>9} {'decode':>9}  throughput"
    lines = [head, "-" * len(head)]
    for r in rows:
        if "encode_images_per_s" in r:
            tp = f"{r['encode_images_per_s']:.1f} img/s encode, {r['codes_to_embedding_per_s']:.1f} img/s codes->embedding"
        else:
            tp = (f"{r['encode_x_realtime']:.1f}x / {r['decode_x_realtime']:.1f}x real time "
                  f"(rtf {r['encode_rtf']:.3f} / {r['decode_rtf']:.3f}), {r['lm_positions_per_s']:g} LM positions/s")
        lines.append(f"{r['codec']:16} {r['size']:5} {r['batch']:>5} {r['params_m']:>7.1f}M "
                     f"{r['encode_s']:>8.3f}s {r['decode_s']:>8.3f}s  {tp}")
    return "\n".join(lines)


def bench_codecs(*, seconds: float = 4.0, batches: tuple[int, ...] = (1, 8), real: bool = True,
                 real_image: bool = False, repeat: int = 1, device: str | None = None,
                 threads: int | None = None, json_path: str | Path | None = None,
                 verbose: bool = True) -> dict[str, Any]:
    """Time encode/decode of every codec (tiny, and real-size unless ``real=False``); print a table.

    ``threads`` sets torch's intra-op threads for the run (restored afterwards): on a shared,
    oversubscribed CPU one thread is often faster than several.
    Returns ``{"rows": [...], "device": ..., "torch": ..., "threads": ...}``; each row has
    ``codec, size, batch, params_m, encode_s, decode_s`` and throughput ratios.
    """
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _bench(seconds, batches, real, real_image, repeat, device, json_path, verbose)
    finally:
        torch.set_num_threads(before)


def _bench(seconds: float, batches: tuple[int, ...], real: bool, real_image: bool, repeat: int,
           device: str | None, json_path: str | Path | None, verbose: bool) -> dict[str, Any]:
    from anygpt import modalities as registry
    from anygpt.modalities.plugin import AudioModality, ImageModality

    rows: list[dict] = []
    for plugin in registry.registered().values():
        audio = isinstance(plugin, AudioModality)
        if not (audio or isinstance(plugin, ImageModality)):
            continue  # no synthetic input for other kinds of media
        for name in registry.codec_names(plugin.name):
            card = registry.codec_card(plugin.name, name)
            cls = registry.codec_class(card)
            sizes = ["tiny"] + (["real"] if (real if audio else real_image) else [])
            for size in sizes:
                codec = cls.tiny(card=card) if size == "tiny" else cls.official(card=card)
                if device:
                    codec.to(device)
                if audio:
                    rows += _audio_rows(codec, size, seconds, batches, repeat)
                else:
                    rows += _image_rows(codec, size, batches, repeat)
                del codec
    result = {
        "rows": rows,
        "device": device or "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }
    if verbose:
        print(format_table(rows))
    if json_path is not None:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=2), encoding="utf-8")
    return result


__all__ = ["bench_codecs", "format_table"]
