"""``anygpt bench data`` (preprocessing part): the pipeline against the codec alone, at real codec size.

The codec is the physical limit of preprocessing: on a CPU box, encoding a second of speech with
the real-size SpeechTokenizer costs far more than reading, resampling and writing it.  So the
benchmark compares, on the same 128 one-second clips (a few minutes on 2 idle cores):

- **codec**: the bare batched ``codec.encode`` (clips decoded and resampled beforehand, batches of
  ``batch_size`` as the pipeline forms them), at ``threads`` torch threads, half of the clips just
  before and half just after the 1-worker pipeline run (a drifting machine load then cancels);
- **pipeline, 1 worker**: ``run_preprocess`` in-process with the same codec object (the
  ``codecs=`` mapping) and the same threads;
- **pipeline, N workers**: spawned workers at the same *total* threads (each ``threads / N``),
  every worker loading the real-size codec from a codecs directory.

``ratio_pipeline_vs_codec`` = pipeline samples/s over codec samples/s (goal >= 0.85) and
``ratio_workers`` = N workers over 1 worker.  Pipeline rates use the span from the first chunk's
start to the last chunk's end (the sidecars' ``timings``), so worker start-up (spawning, importing
torch, loading a 100 M-parameter codec) is not counted: at real corpus sizes it is amortised.  Wall
times with start-up are reported beside them.  Where the pipeline's time goes comes from the
workers' per-phase timers (``read`` = media decode + resampling + filters, ``encode``, ``write``
= code checks + sample building + tar writing); decode and resampling are also timed apart on the
same files.

Real-size codecs are the released architectures with random weights (speed does not depend on the
weight values), built as ``anygpt bench codecs`` builds them and saved to a temporary codecs
directory so the spawned workers can load them.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from anygpt import modalities as registry
from anygpt.modalities import media
from anygpt.modalities.plugin import AudioModality
from data_pipeline.options import PreprocessOptions
from data_pipeline.runner import _cpus, run_preprocess
from data_pipeline.shards import list_sidecars

# Clips are written at a rate other than the codec's, so resampling is part of what is measured
# (as with 44.1/48 kHz sources); speech corpora at 16 kHz skip that step.
FILE_RATE = 22050


def _corpus(root: Path, n: int, seconds: float, modalities: tuple[str, ...]) -> Path:
    from data_pipeline.synthetic import write_audio

    rows = []
    for i in range(n):
        m = modalities[i % len(modalities)]
        rel = f"{m}/{i:05d}.flac"
        write_audio(root / rel, seconds, FILE_RATE, seed=i)
        rows.append({"id": f"{m}{i:05d}", "text": f"clip number {i}", m: rel})
    path = root / "manifest.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _decoded(root: Path, manifest: Path, codecs: dict) -> tuple[list[tuple[str, np.ndarray]], float, float]:
    """Every clip decoded and resampled for its codec: ``(clips, decode_s, resample_s)``."""
    import soundfile as sf

    clips = []
    decode = resample = 0.0
    for line in manifest.read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        m = next(k for k in r if k in codecs)
        t0 = time.perf_counter()
        data, sr = sf.read(str(root / r[m]), dtype="float32", always_2d=True)
        t1 = time.perf_counter()
        clips.append((m, media.resample(media.to_mono(data), sr, int(codecs[m].sample_rate))))
        decode, resample = decode + t1 - t0, resample + time.perf_counter() - t1
    return clips, decode, resample


def _encode(clips: list[tuple[str, np.ndarray]], codecs: dict, batch_size: int) -> float:
    """Seconds of bare batched ``codec.encode`` over ``clips`` (batched per modality, like the pipeline)."""
    import torch

    t0 = time.perf_counter()
    with torch.inference_mode():
        for m, codec in codecs.items():
            ws = [w for mm, w in clips if mm == m]
            for i in range(0, len(ws), batch_size):
                codec.encode(ws[i : i + batch_size])
    return time.perf_counter() - t0


def _pipeline(manifest: Path, out: Path, codecs_dir: Path, workers: int, shard_size: int, batch_size: int,
              codecs: Optional[dict]) -> dict[str, Any]:
    opts = PreprocessOptions(source="manifest", input=str(manifest), out=str(out), codecs=str(codecs_dir),
                             workers=workers, shard_size=shard_size, batch_size=batch_size, device="cpu",
                             progress=False)
    t0 = time.perf_counter()
    stats = run_preprocess(opts, codecs=codecs if workers == 1 else None, verbose=False)
    wall = time.perf_counter() - t0
    recs = list_sidecars(out)
    span = max(r["timings"]["ended"] for r in recs) - min(r["timings"]["started"] for r in recs)
    return {"workers": workers, "samples": stats["written"], "wall_s": round(wall, 3), "seconds": round(span, 3),
            "samples_per_s": stats["written"] / span if span > 0 else 0.0, "timings": stats["timings"]}


def bench_data(n: int = 128, seconds: float = 1.0, modalities: tuple[str, ...] = ("speech",), workers: int = 2,
               shard_size: int = 16, batch_size: int = 8, threads: Optional[int] = None, real: bool = True,
               verbose: bool = True) -> dict[str, Any]:
    """Pipeline vs bare codec at real codec size, and 1 vs ``workers`` workers; returns the numbers.

    Args:
        n: clips (``seconds`` long each, round-robin over ``modalities``, audio modalities only).
        workers: worker processes of the parallel run (each gets ``threads // workers`` threads).
        shard_size, batch_size: the pipeline's chunking and codec batch (the bare codec uses the
            same batches).
        threads: total torch threads (default: the CPUs this process may use; the N-worker run
            always splits those CPUs).
        real: real-size codecs (``False``: the tiny ones, to test the benchmark itself quickly).
        verbose: print the table.

    Returns:
        ``{"inputs", "seconds_per_clip", "threads", "codecs", "codec": {"samples_per_s", ...},
        "runs": [{"workers", "samples", "seconds", "wall_s", "samples_per_s", "timings"}, ...],
        "ratio_pipeline_vs_codec", "ratio_encode_share", "ratio_workers", "breakdown": {phase: seconds}}``.
        ``ratio_encode_share`` is the codec's share of the 1-worker pipeline's own time (its
        ``encode`` timer over its span): the same question answered inside one run, so it does
        not drift with the load of a shared machine the way two runs minutes apart can.
    """
    import torch

    for m in modalities:
        if not isinstance(registry.get(m), AudioModality):
            raise ValueError(f"bench data: {m} is not an audio modality (the benchmark writes audio clips)")
    threads = threads or _cpus()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with tempfile.TemporaryDirectory(prefix="anygpt-bench-data-") as tmp:
            root = Path(tmp)
            codecs: dict[str, Any] = {}
            for m in modalities:
                card = registry.codec_card(m)
                cls = registry.codec_class(card)
                (cls.official(card=card) if real else cls.tiny(card=card)).save(root / "codecs" / m)
                codecs[m] = registry.build_codec(m, str(root / "codecs" / m)).eval()
            manifest = _corpus(root / "corpus", n, seconds, modalities)
            clips, decode_s, resample_s = _decoded(root / "corpus", manifest, codecs)
            _encode(clips[: len(codecs)], codecs, batch_size)  # warm-up: one-off costs (weight packing)
            # The bare codec runs half before and half after the 1-worker pipeline: on a shared machine
            # the load drifts over minutes, and bracketing the pipeline cancels a steady drift.
            half = len(clips) // 2
            encode_s = _encode(clips[:half], codecs, batch_size)
            runs = [_pipeline(manifest, root / "out1", root / "codecs", 1, shard_size, batch_size, codecs)]
            encode_s += _encode(clips[half:], codecs, batch_size)
            del codecs, clips  # the N-worker run loads its own copies; free this one's memory first
            runs.append(_pipeline(manifest, root / f"out{workers}", root / "codecs", workers, shard_size,
                                  batch_size, None))
    finally:
        torch.set_num_threads(before)
    codec_rate = n / encode_s if encode_s > 0 else 0.0
    t = runs[0]["timings"]
    breakdown = {"media decode (measured apart)": decode_s, "resampling (measured apart)": resample_s,
                 "read total (decode + resample + filters)": t["read_s"], "encode": t["encode_s"],
                 "tar write (+ code checks, samples)": t["write_s"],
                 "other (plan reads, commits, bookkeeping)": max(0.0, runs[0]["seconds"] - t["read_s"] - t["encode_s"]
                                                                 - t["write_s"])}
    result = {
        "inputs": n, "real": real, "seconds_per_clip": seconds, "threads": threads, "cpu_count": os.cpu_count(),
        "codecs": {m: registry.codec_card(m)["name"] for m in modalities},
        "codec": {"samples_per_s": codec_rate, "encode_s": round(encode_s, 3)},
        "runs": runs,
        "ratio_pipeline_vs_codec": runs[0]["samples_per_s"] / codec_rate if codec_rate else 0.0,
        "ratio_encode_share": t["encode_s"] / runs[0]["seconds"] if runs[0]["seconds"] > 0 else 0.0,
        "ratio_workers": runs[1]["samples_per_s"] / runs[0]["samples_per_s"] if runs[0]["samples_per_s"] else 0.0,
        "breakdown": {k: round(v, 3) for k, v in breakdown.items()},
    }
    if verbose:
        print(format_table(result))
    return result


def format_table(result: dict) -> str:
    codecs = ", ".join(f"{m}: {c}" for m, c in result["codecs"].items())
    size = "real codec size" if result["real"] else "TINY codecs (a test of the benchmark, not a measurement)"
    lines = [f"preprocessing at {size} ({codecs}, random weights): {result['inputs']} clips of "
             f"{result['seconds_per_clip']:g} s, {result['threads']} torch threads in total",
             f"{'run':<28} {'samples/s':>9} {'s (steady)':>10} {'s (wall)':>9}",
             f"{'codec encode alone':<28} {result['codec']['samples_per_s']:>9.2f} {result['codec']['encode_s']:>10.1f}"]
    for r in result["runs"]:
        per = result["threads"] // r["workers"] if r["workers"] > 1 else result["threads"]
        lines.append(f"{'pipeline, ' + str(r['workers']) + ' worker(s) x ' + str(per) + ' thr':<28} "
                     f"{r['samples_per_s']:>9.2f} {r['seconds']:>10.1f} {r['wall_s']:>9.1f}")
    n = result["runs"][1]["workers"]
    lines.append(f"ratio pipeline / codec alone: {result['ratio_pipeline_vs_codec']:.2f} (goal >= 0.85)")
    lines.append(f"codec share of the pipeline's own time: {result['ratio_encode_share']:.2f} (same run, "
                 "immune to load drift)")
    lines.append(f"ratio {n} workers / 1 worker at the same total threads: {result['ratio_workers']:.2f}")
    lines.append("where the 1-worker pipeline's time goes (seconds):")
    for k, v in result["breakdown"].items():
        lines.append(f"  {k:<44} {v:>8.2f}")
    return "\n".join(lines)


__all__ = ["bench_data", "format_table"]
