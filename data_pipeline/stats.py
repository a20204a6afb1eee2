"""Run accounting: ``stats.json`` and ``errors.jsonl`` rebuilt from the chunk sidecars.

Aggregating the sidecars (rather than counting in memory) is what keeps the numbers right across
crashes, reruns and ranks: a redone chunk replaces its sidecar, so nothing is counted twice, and
any rank can rebuild the totals of the whole output directory at any time.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, Optional, Union

from data_pipeline.shards import atomic_write_text, list_sidecars

STATS_FILE = "stats.json"
ERRORS_FILE = "errors.jsonl"


def aggregate(out_dir: Union[str, Path], prefix: Optional[str] = None, chunks_total: Optional[int] = None,
              inputs_total: Optional[int] = None) -> tuple[dict[str, Any], list[dict]]:
    """Totals over every finished chunk of ``out_dir``; returns ``(stats, error_lines)``."""
    recs = list_sidecars(out_dir, prefix)
    c: dict[str, Counter] = {k: Counter() for k in ("skipped_by_reason", "tokens", "codes", "media", "audio_seconds")}
    totals = Counter()
    spent: Counter = Counter()
    shards, errors = [], []
    for r in recs:
        for k in ("inputs", "written", "skipped", "bytes"):
            totals[k] += r.get(k, 0)
        t = r.get("timings", {})
        spent.update({k: t[k] for k in ("read_s", "encode_s", "write_s") if k in t})
        spent["chunk_s"] += r.get("elapsed_s", 0.0)
        for k in c:
            c[k].update(r.get(k, {}))
        shards += [{"name": p["name"], "samples": p["samples"], "bytes": p["bytes"]} for p in r.get("parts", [])]
        errors += r.get("errors", [])
    stats: dict[str, Any] = {
        "inputs": totals["inputs"],
        "written": totals["written"],
        "skipped": totals["skipped"],
        "skipped_by_reason": dict(sorted(c["skipped_by_reason"].items())),
        "tokens": dict(sorted(c["tokens"].items())),
        "codes": dict(sorted(c["codes"].items())),
        "media": dict(sorted(c["media"].items())),
        "audio_hours": {k: round(v / 3600.0, 6) for k, v in sorted(c["audio_seconds"].items())},
        "bytes": totals["bytes"],
        "shards": shards,
        "chunks_done": len(recs),
        "chunks_total": chunks_total,
        "inputs_total": inputs_total,
        "complete": chunks_total is not None and len(recs) == chunks_total,
        # Worker seconds by phase, summed over chunks (see ChunkProcessor.process_chunk).
        "timings": {k: round(spent[k], 3) for k in ("read_s", "encode_s", "write_s", "chunk_s")},
    }
    return stats, errors


def write_stats(out_dir: Union[str, Path], stats: dict, errors: list[dict]) -> None:
    """Write ``stats.json`` and ``errors.jsonl`` atomically, unless a more complete copy is already there.

    Several ranks finish at different times and each rebuilds the totals; the guard keeps a rank
    that aggregated earlier from overwriting the totals of one that saw more finished chunks.
    """
    out = Path(out_dir)
    try:
        old = json.loads((out / STATS_FILE).read_text(encoding="utf-8"))
        if old.get("chunks_done", 0) > stats["chunks_done"] and old.get("chunks_total") == stats["chunks_total"]:
            return
    except (OSError, json.JSONDecodeError):
        pass
    atomic_write_text(out / ERRORS_FILE, "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in errors))
    atomic_write_text(out / STATS_FILE, json.dumps(stats, indent=2, ensure_ascii=False) + "\n")


def _fmt_int(n: float) -> str:
    return f"{int(n):,}"


def summary_table(stats: dict, elapsed: Optional[float] = None, this_rank: Optional[dict] = None) -> str:
    """A small human summary of a run (printed at the end)."""
    rows = [("inputs", _fmt_int(stats["inputs"])), ("written", _fmt_int(stats["written"])),
            ("skipped", _fmt_int(stats["skipped"]))]
    for reason, n in stats["skipped_by_reason"].items():
        rows.append((f"  {reason}", _fmt_int(n)))
    for m, n in stats["tokens"].items():
        rows.append((f"tokens {m}", _fmt_int(n)))
    for m, h in stats["audio_hours"].items():
        rows.append((f"hours {m}", f"{h:.4g}"))
    for m, n in stats["media"].items():
        rows.append((f"items {m}", _fmt_int(n)))
    rows.append(("shards", f"{len(stats['shards'])} ({stats['bytes'] / 1e6:.1f} MB)"))
    done = f"{stats['chunks_done']}/{stats['chunks_total']}" if stats.get("chunks_total") is not None else str(stats["chunks_done"])
    rows.append(("chunks done", done + ("" if stats.get("complete") else "  (incomplete: other ranks or a rerun)")))
    if this_rank is not None:
        rows.append(("this rank", f"{this_rank['inputs']} inputs in {this_rank['chunks']} chunks "
                                  f"({this_rank['skipped_chunks']} already done)"))
    if elapsed is not None:
        rate = this_rank["inputs"] / elapsed if this_rank and elapsed > 0 else 0.0
        rows.append(("time", f"{elapsed:.1f} s ({rate:.1f} inputs/s)"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


__all__ = ["aggregate", "write_stats", "summary_table", "STATS_FILE", "ERRORS_FILE"]
