"""``anygpt bench data`` (preprocessing part): samples/s with 1 worker vs N workers, side by side.

Both runs encode the same synthetic corpus (speech clips and pictures) with the tiny codecs into
fresh directories; wall time is what a user waits for.
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from data_pipeline.options import PreprocessOptions
from data_pipeline.runner import run_preprocess


def _timed_run(manifest: Path, out: Path, workers: int, shard_size: int, codecs: Optional[dict]) -> tuple[float, dict]:
    opts = PreprocessOptions(source="manifest", input=str(manifest), out=str(out), tiny=True, workers=workers,
                             shard_size=shard_size, batch_size=8, progress=False)
    t = time.perf_counter()
    stats = run_preprocess(opts, codecs=codecs if workers == 1 else None, verbose=False)
    return time.perf_counter() - t, stats


def bench_data(workers: int = 2, n: int = 48, seconds: float = 1.0, shard_size: int = 4,
               verbose: bool = True) -> dict[str, Any]:
    """Preprocessing throughput with 1 worker and with ``workers`` workers; returns the numbers.

    The 1-worker run is what ``--workers 1`` does (in-process) and is warmed up first (imports and
    codecs ready); the N-worker run includes spawning its workers, each importing torch and building
    its codecs.  Both choices favour the baseline, so the ratio is a conservative speed-up.

    Args:
        workers: worker processes of the parallel run.
        n: inputs (alternating ``seconds``-long speech clips and 64x48 pictures).
        shard_size: inputs per chunk (small, so there are enough chunks to share out).
        verbose: print a small table with the ratio.

    Returns:
        ``{"inputs", "cpu_count", "runs": [{"workers", "seconds", "samples", "samples_per_s"}, ...],
        "ratio"}`` with ``ratio`` = samples/s of ``workers`` workers over samples/s of 1 worker.
    """
    from data_pipeline.synthetic import speech_image_manifest

    with tempfile.TemporaryDirectory(prefix="anygpt-bench-data-") as tmp:
        root = Path(tmp)
        manifest = speech_image_manifest(root / "corpus", n, seconds=seconds)
        codecs: dict = {}
        _timed_run(speech_image_manifest(root / "warm", 2, seconds=seconds), root / "warm_out", 1, 1, codecs)
        runs = []
        for w in (1, workers):
            wall, stats = _timed_run(manifest, root / f"out{w}", w, shard_size, codecs)
            runs.append({"workers": w, "seconds": round(wall, 3), "samples": stats["written"],
                         "samples_per_s": stats["written"] / wall if wall > 0 else 0.0})
    ratio = runs[1]["samples_per_s"] / runs[0]["samples_per_s"] if runs[0]["samples_per_s"] else 0.0
    result = {"inputs": n, "cpu_count": os.cpu_count(), "runs": runs, "ratio": ratio}
    if verbose:
        print(format_table(result))
    return result


def format_table(result: dict) -> str:
    lines = [f"preprocessing: tiny codecs, {result['inputs']} inputs (speech clips + pictures), "
             f"{result['cpu_count']} CPU cores",
             f"{'workers':>7}  {'wall s':>7}  {'samples/s':>9}"]
    for r in result["runs"]:
        lines.append(f"{r['workers']:>7}  {r['seconds']:>7.2f}  {r['samples_per_s']:>9.1f}")
    n = result["runs"][1]["workers"]
    lines.append(f"ratio {n} workers / 1 worker: {result['ratio']:.2f}x (worker start-up included)")
    return "\n".join(lines)


__all__ = ["bench_data", "format_table"]
