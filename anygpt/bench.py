"""``anygpt bench``: every benchmark of the project in one table, with machine and package versions.

Each benchmark measures a ratio side by side in one run (ours vs a baseline on the same machine),
because absolute speeds on a shared 2-core box swing by 2-3x; ratios are what to compare.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

PACKAGES = ("torch", "transformers", "deepspeed", "diffusers", "webdataset", "tokenizers", "numpy", "anygpt-trainer")


def _codecs(args: argparse.Namespace) -> dict:
    from anygpt.modalities.bench import bench_codecs

    return bench_codecs(seconds=2.0, batches=(1, 4), real=True)


def _data(args: argparse.Namespace) -> dict:
    from anygpt.data.bench import bench_loader
    from data_pipeline.bench import bench_data

    return {"preprocess": bench_data(), "loader": bench_loader()}


def _train(args: argparse.Namespace) -> dict:
    from anygpt.train.bench import bench_attention, bench_codecs_train, bench_train

    return {**bench_train(), "attention": bench_attention(), "codecs": bench_codecs_train()}


def _infer(args: argparse.Namespace) -> dict:
    from anygpt.infer.bench import bench_infer

    return bench_infer(model="tiny", context=512)


def _serve(args: argparse.Namespace) -> dict:
    import importlib.util

    missing = [m for m in ("fastapi", "uvicorn", "httpx") if importlib.util.find_spec(m) is None]
    if missing:  # the web extra is optional: the other benchmarks still run
        print(f"[bench] serve skipped: needs the web extra ({', '.join(missing)} missing)")
        return {"skipped": f"missing {', '.join(missing)}"}
    from anygpt.serve.bench import bench_serve

    return bench_serve(clients=args.clients, requests=args.requests)


def _align(args: argparse.Namespace) -> dict:
    from anygpt.align.bench import bench_align

    return bench_align()


def _gpu(args: argparse.Namespace) -> dict:
    from anygpt.gpu_check import gpu_check

    return gpu_check(args)


BENCHES: dict[str, Callable[[argparse.Namespace], dict]] = {
    "codecs": _codecs, "data": _data, "train": _train, "infer": _infer, "serve": _serve, "align": _align,
    "gpu": _gpu}
DEFAULT = ("codecs", "data", "train", "infer", "serve", "align")  # `gpu` needs a GPU (or --dry-run): asked for by name only


def ratios(result: Any, prefix: str = "") -> dict[str, float]:
    """Every number whose key says it is a ratio/speedup (nested keys joined by dots)."""
    out: dict[str, float] = {}
    if isinstance(result, dict):
        for k, v in result.items():
            name = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and any(
                    w in str(k).lower() for w in ("ratio", "speedup", "headroom", "real_time", "rtf")):
                out[name] = float(v)
            elif isinstance(v, (dict, list)):
                out.update(ratios(v, name))
    elif isinstance(result, list):
        for i, v in enumerate(result):
            # Name table rows by what they measured (codec/size/batch) rather than by index.
            label = "/".join(str(v[k]) for k in ("codec", "size", "batch", "workers", "path") if k in v) \
                if isinstance(v, dict) else ""
            out.update(ratios(v, f"{prefix}[{label or i}]"))
    return out


def machine() -> dict[str, Any]:
    mem = None
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        pass
    versions = {}
    for p in PACKAGES:
        try:
            versions[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            versions[p] = None
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001 - a broken CUDA install must not stop the report
        gpu = None
    return {"cpus": os.cpu_count(), "memory_gib": round(mem, 1) if mem else None, "gpu": gpu,
            "python": platform.python_version(), "platform": platform.platform(), "packages": versions}


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    from anygpt.gpu_check import add_gpu_arguments  # standard library only: cheap at parser time

    p = sub.add_parser("bench", help=f"run the benchmarks ({', '.join(BENCHES)}) and print one table",
                       description="Benchmarks as ratios measured side by side. `gpu` is the one-script GPU "
                                   "check (training per attention path with tokens/s, memory and MFU; codec "
                                   "real-time factors; KV-cached generation); --dry-run runs it at tiny sizes.")
    # No argparse `choices` here: with nargs="*" it rejects the empty default (a known argparse quirk).
    p.add_argument("which", nargs="*", metavar="{" + ",".join(BENCHES) + "}",
                   help=f"subset to run (default: {', '.join(DEFAULT)})")
    p.add_argument("--json", default=None, help="write results, ratios, machine and package versions here")
    p.add_argument("--clients", type=int, default=4, metavar="N", help="serve: concurrent API clients (default 4)")
    p.add_argument("--requests", type=int, default=32, metavar="N", help="serve: requests in all (default 32)")
    add_gpu_arguments(p)
    p.set_defaults(handler=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    which = args.which or list(DEFAULT)
    unknown = [w for w in which if w not in BENCHES]
    if unknown:
        raise ValueError(f"bench: unknown benchmark {unknown[0]!r}; choose from {', '.join(BENCHES)}")
    results, table, seconds = {}, [], {}
    for name in which:
        print(f"[bench] {name} ...", flush=True)
        t0 = time.perf_counter()
        results[name] = BENCHES[name](args)
        seconds[name] = round(time.perf_counter() - t0, 1)
        table += [(name, k, v) for k, v in ratios(results[name]).items()]
    print(f"\n{'bench':<8} {'ratio':<60} {'value':>10}")
    for name, key, value in table:
        print(f"{name:<8} {key[:60]:<60} {value:>10.2f}")
    report = {"machine": machine(), "seconds": seconds, "ratios": {f"{n}.{k}": v for n, k, v in table},
              "results": results}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    return 0
