"""The preprocessing driver: count, plan chunks, skip finished ones, run workers, aggregate.

Plan of a run (one rank):

1. Validate settings and open the reader (errors here are one line, before any file is written).
2. Pass 1 over the reader counts the inputs and notes which modalities they need; ``run.json``
   pins the settings and the input count, so a rerun with other settings or a changed corpus is
   refused instead of silently mixing two datasets.
3. Inputs are cut into chunks of ``shard_size``; this rank owns chunks ``c % world_size == rank``.
   Chunks with a valid sidecar are finished and skipped; leftovers of the others are deleted.
4. Pass 2 streams the inputs again and hands each pending chunk to a worker (in-process for one
   worker, else a pool of spawned processes, each with its own codecs and GPU if any), keeping only
   a few chunks in flight so memory stays bounded whatever the corpus size.
5. ``stats.json``/``errors.jsonl`` are rebuilt from all sidecars in the directory.
"""
from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import queue as queue_mod
import shutil
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, Iterator, Optional

from anygpt import modalities as registry
from anygpt.modalities.cards import resolve_files
from anygpt.modalities.plugin import CodecError
from data_pipeline.options import PreprocessError, PreprocessOptions
from data_pipeline.readers import InputItem, build_reader
from data_pipeline.shards import CHUNK_DIR, atomic_write_text, read_sidecar, remove_chunk_files
from data_pipeline.stats import ERRORS_FILE, STATS_FILE, aggregate, summary_table, write_stats

RUN_FILE = "run.json"


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _limited(reader, limit: Optional[int]) -> Iterator[InputItem]:
    for n, item in enumerate(reader):
        if limit is not None and n >= limit:
            return
        yield item


def count_inputs(reader, limit: Optional[int] = None) -> tuple[int, dict[str, int]]:
    """Pass 1: number of inputs and media items per modality."""
    n = 0
    modalities: dict[str, int] = {}
    for item in _limited(reader, limit):
        n += 1
        for ref in item.media:
            modalities[ref.modality] = modalities.get(ref.modality, 0) + 1
    return n, modalities


def owned_chunks(n_chunks: int, rank: int, world_size: int) -> list[int]:
    """Chunks written by ``rank``: round-robin, so every chunk has exactly one owner."""
    return list(range(rank, n_chunks, world_size))


def iter_chunks(reader, shard_size: int, limit: Optional[int] = None) -> Iterator[tuple[int, int, list[InputItem]]]:
    """``(chunk, first_input_index, items)`` for consecutive groups of ``shard_size`` inputs."""
    buf: list[InputItem] = []
    chunk = 0
    for item in _limited(reader, limit):
        buf.append(item)
        if len(buf) == shard_size:
            yield chunk, chunk * shard_size, buf
            buf, chunk = [], chunk + 1
    if buf:
        yield chunk, chunk * shard_size, buf


def clear_outputs(out: Path, prefix: str) -> None:
    """``--overwrite``: remove what a previous run wrote (only files with our names)."""
    for p in out.glob(f"{prefix}-*.tar*"):
        p.unlink()
    shutil.rmtree(out / CHUNK_DIR, ignore_errors=True)
    for name in (STATS_FILE, ERRORS_FILE, RUN_FILE):
        if (out / name).exists():
            (out / name).unlink()


def _check_run_file(out: Path, opts: PreprocessOptions, inputs_total: int) -> None:
    """Refuse to resume into ``out`` when it was started with other settings or another input."""
    path = out / RUN_FILE
    if not path.exists():
        return
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return  # unreadable: rewritten below (it is only written by this code, atomically)
    settings, before = opts.fingerprint(), old.get("settings", {})
    diff = [k for k in sorted(set(settings) | set(before)) if settings.get(k) != before.get(k)]
    if diff:
        k = diff[0]
        raise PreprocessError(f"{out} holds a run with other settings ({k}: {before.get(k)!r} there, "
                              f"{settings.get(k)!r} now); use another --out or --overwrite")
    if old.get("inputs_total") != inputs_total:
        raise PreprocessError(f"the input changed since {out} was started ({old.get('inputs_total')} inputs "
                              f"then, {inputs_total} now); use another --out or --overwrite")


def _write_run_file(out: Path, opts: PreprocessOptions, inputs_total: int, chunks_total: int) -> None:
    if (out / RUN_FILE).exists():
        return
    atomic_write_text(out / RUN_FILE, json.dumps({"settings": opts.fingerprint(), "inputs_total": inputs_total,
                                                  "chunks_total": chunks_total}, indent=2, ensure_ascii=False) + "\n")


def _preflight_codecs(opts: PreprocessOptions, needed: list[str], counts: dict[str, int]) -> None:
    """Every codec directory the inputs need exists and holds its card's files (cheap: no weights read)."""
    if not opts.codecs:
        return
    cards = opts.run_cards()
    for m in needed:
        try:
            d = registry.codec_dir(opts.codecs, m)
        except CodecError:
            raise PreprocessError(f"--codecs: {opts.codecs} has no '{m}/' codec directory, needed by {counts[m]} input(s)") from None
        try:
            resolve_files(cards[m], d)
        except CodecError as e:
            raise PreprocessError(f"--codecs: {m}: {str(e).splitlines()[0] if str(e) else e}") from None


def _pick_device(opts: PreprocessOptions, worker_id: int, workers: int) -> str:
    """``auto``: one GPU per worker when GPUs exist (round-robin over the node's GPUs), else CPU."""
    if opts.device != "auto":
        return opts.device
    try:
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:
        n = 0
    if n == 0:
        return "cpu"
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0")) or 0)
    return f"cuda:{(local_rank * workers + worker_id) % n}"


# ------------------------------------------------------------------------------ worker processes
_WORKER: dict[str, Any] = {}


def _init_worker(opts: PreprocessOptions, counter, progress_queue, workers: int) -> None:
    import torch

    from data_pipeline.worker import ChunkProcessor

    with counter.get_lock():
        wid = counter.value
        counter.value += 1
    # Share the machine's cores between the workers instead of oversubscribing them.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    _WORKER["proc"] = ChunkProcessor(opts, device=_pick_device(opts, wid, workers))
    _WORKER["queue"] = progress_queue


def _run_chunk(chunk: int, first: int, items: list[InputItem]) -> dict:
    q = _WORKER["queue"]
    rec = _WORKER["proc"].process_chunk(chunk, first, items, progress=lambda n, w: q.put((n, w)))
    rec = dict(rec)
    rec.pop("errors", None)  # the parent only needs counts; errors live in the sidecar
    return rec


# ------------------------------------------------------------------------------ the run
def run_preprocess(opts: PreprocessOptions, codecs: Optional[dict] = None, verbose: bool = True) -> dict[str, Any]:
    """Run (or resume) preprocessing for this rank and return the aggregated ``stats.json`` content.

    Args:
        opts: run settings (validated here; :class:`PreprocessError` before any work on a bad one).
        codecs: already-built codecs by modality, used when running in-process (``workers == 1``);
            missing ones are loaded from ``opts.codecs`` / tiny.
        verbose: log the plan line and the summary table (to stderr).
    """
    log = _log if verbose else (lambda msg: None)
    t_start = time.time()
    opts.validate()
    rank, world = opts.resolve_rank()
    if opts.overwrite and world > 1:
        raise PreprocessError("--overwrite with several ranks would let them delete each other's shards; "
                              "clear OUT once before launching the ranks")
    reader = build_reader(opts)
    out = Path(opts.out)

    # Pass 1: count (and learn which codecs are needed); every check below still writes nothing.
    inputs_total, modalities = count_inputs(reader, opts.limit)
    n_chunks = math.ceil(inputs_total / opts.shard_size)
    if not opts.overwrite:
        _check_run_file(out, opts, inputs_total)
    needed = [m for m in sorted(modalities) if not (codecs and m in codecs)]
    _preflight_codecs(opts, needed, modalities)

    mine = owned_chunks(n_chunks, rank, world)
    done = set() if opts.overwrite else {c for c in mine if read_sidecar(out, opts.prefix, c) is not None}
    pending = [c for c in mine if c not in done]
    in_process = opts.workers <= 1 or len(pending) <= 1
    proc = None
    if in_process and pending:
        from data_pipeline.worker import ChunkProcessor

        proc = ChunkProcessor(opts, codecs=codecs, device=_pick_device(opts, 0, 1))
        for m in needed:  # a checkpoint that does not load fails now, not after the first shard
            proc.codec(m)

    # From here on the output directory is written.
    out.mkdir(parents=True, exist_ok=True)
    if opts.overwrite:
        clear_outputs(out, opts.prefix)
    _write_run_file(out, opts, inputs_total, n_chunks)
    for c in pending:
        remove_chunk_files(out, opts.prefix, c)
    pending_set = set(pending)
    pending_inputs = sum(min(opts.shard_size, inputs_total - c * opts.shard_size) for c in pending)
    log(f"[rank {rank}/{world}] {opts.source}: {inputs_total} inputs, {n_chunks} chunks of {opts.shard_size}; "
        f"this rank: {len(mine)} chunks, {len(done)} already done, {len(pending)} to do ({pending_inputs} inputs), "
        f"{opts.workers if not in_process else 1} worker(s)")

    tasks = ((c, first, items) for c, first, items in iter_chunks(reader, opts.shard_size, opts.limit)
             if c in pending_set)
    bar = _progress_bar(opts, pending_inputs, rank)
    written_here = 0
    t_work = time.time()
    try:
        if proc is not None:
            def tick(n: int, w: int) -> None:
                nonlocal written_here
                written_here += w
                bar.update(n)
                bar.set_postfix(written=written_here, refresh=False)

            for c, first, items in tasks:
                proc.process_chunk(c, first, items, progress=tick)
        elif pending:
            written_here = _run_pool(opts, tasks, bar)
    finally:
        bar.close()
    elapsed_work = time.time() - t_work

    stats, errors = aggregate(out, opts.prefix, n_chunks, inputs_total)
    write_stats(out, stats, errors)
    log(summary_table(stats, time.time() - t_start,
                       {"inputs": pending_inputs, "chunks": len(mine), "skipped_chunks": len(done)}))
    stats = dict(stats)
    stats["this_rank"] = {"rank": rank, "world_size": world, "chunks": len(mine), "chunks_skipped": len(done),
                          "inputs_processed": pending_inputs, "written": written_here,
                          "seconds": round(elapsed_work, 3)}
    return stats


def _progress_bar(opts: PreprocessOptions, total: int, rank: int):
    from tqdm import tqdm

    tty = sys.stderr.isatty()
    disable = (not tty) if opts.progress is None else (not opts.progress)
    # In log files (not a TTY) a forced bar prints a line at most every 30 s instead of redrawing.
    return tqdm(total=total, unit="sample", desc=f"preprocess r{rank}", disable=disable, dynamic_ncols=True,
                mininterval=0.5 if tty else 30.0, smoothing=0.1)


def _run_pool(opts: PreprocessOptions, tasks: Iterator, bar) -> int:
    ctx = mp.get_context("spawn")  # fork after torch/OpenMP initialisation can deadlock
    counter = ctx.Value("i", 0)
    progress_q = ctx.Queue()
    written = 0  # from the workers' results (exact); the progress messages only move the bar
    shown = 0

    def drain() -> None:
        nonlocal shown
        while True:
            try:
                n, w = progress_q.get_nowait()
            except queue_mod.Empty:
                return
            shown += w
            bar.update(n)
            bar.set_postfix(written=shown, refresh=False)

    max_in_flight = 2 * opts.workers
    ex = ProcessPoolExecutor(max_workers=opts.workers, mp_context=ctx, initializer=_init_worker,
                             initargs=(opts, counter, progress_q, opts.workers))
    in_flight: set = set()
    try:
        def collect(block_until: int) -> None:
            nonlocal in_flight, written
            while len(in_flight) > block_until:
                finished, in_flight = wait(in_flight, timeout=0.2, return_when=FIRST_COMPLETED)
                drain()
                for fut in finished:
                    written += fut.result()["written"]  # re-raises a worker's failure here

        for task in tasks:
            collect(max_in_flight - 1)
            in_flight.add(ex.submit(_run_chunk, *task))
        collect(0)
        time.sleep(0.05)
        drain()
    except BrokenProcessPool as e:
        raise ChildProcessError(f"a preprocessing worker process died ({e}); finished shards are kept, "
                                "rerun the same command to resume") from None
    finally:
        for fut in in_flight:
            fut.cancel()
        ex.shutdown(wait=True, cancel_futures=True)
    return written


__all__ = ["run_preprocess", "count_inputs", "owned_chunks", "iter_chunks", "clear_outputs", "RUN_FILE"]
