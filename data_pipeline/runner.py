"""The preprocessing driver: plan once, skip finished chunks, run this rank's chunks, aggregate.

Plan of a run (one rank):

1. Validate settings and resolve this rank (errors here are one line, before any file is written).
2. The plan (:mod:`data_pipeline.plan`): the first rank to start scans the corpus once (pass 1),
   numbering the inputs and cutting them into chunks of ``shard_size``, and commits
   ``plan.json``; every other rank, and every rerun, reads it instead of scanning.  ``run.json``
   and the plan pin the settings, so a rerun with other settings is refused instead of silently
   mixing two datasets.
3. This rank owns chunks ``c % world_size == rank``.  Chunks with a valid sidecar are finished
   and skipped; leftovers of the others are deleted.
4. The pending chunks' inputs are read from the plan (one seek per chunk) and handed to the
   engine: ``local`` (in-process for one worker, else a pool of spawned processes, each with its
   own codecs and GPU if any, a few chunks in flight so memory stays bounded) or ``ray``
   (:mod:`data_pipeline.ray_engine`: one actor per GPU or CPU slot around the same
   :class:`~data_pipeline.worker.ChunkProcessor`).  Either way the shards are written by our
   writer, so their names and bytes do not depend on the engine.
5. ``stats.json``/``errors.jsonl`` are rebuilt from all sidecars in the directory.

``--status`` (:func:`run_status`) reads the plan and the sidecars and does no work.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import queue as queue_mod
import shutil
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from anygpt import modalities as registry
from anygpt.modalities.cards import resolve_files
from anygpt.modalities.plugin import CodecError
from data_pipeline.options import PreprocessError, PreprocessOptions, resolve_rank
from data_pipeline.plan import Plan, obtain_plan, settings_mismatch
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


def owned_chunks(n_chunks: int, rank: int, world_size: int) -> list[int]:
    """Chunks written by ``rank``: round-robin, so every chunk has exactly one owner."""
    return list(range(rank, n_chunks, world_size))


def clear_outputs(out: Path, prefix: str) -> None:
    """``--overwrite``: remove what a previous run wrote (only files with our names).

    The plan is not removed here: ``--overwrite`` has just replaced it by a fresh scan.
    """
    for p in out.glob(f"{prefix}-*.tar*"):
        p.unlink()
    shutil.rmtree(out / CHUNK_DIR, ignore_errors=True)
    for name in (STATS_FILE, ERRORS_FILE, RUN_FILE):
        if (out / name).exists():
            (out / name).unlink()


def _read_run_file(out: Path) -> Optional[dict]:
    try:
        return json.loads((out / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None  # absent or unreadable: (re)written below (only this code writes it, atomically)


def _check_run_file(out: Path, opts: PreprocessOptions, inputs_total: Optional[int] = None) -> None:
    """Refuse to resume into ``out`` when it was started with other settings (or another input)."""
    old = _read_run_file(out)
    if old is None:
        return
    msg = settings_mismatch(out, RUN_FILE, old.get("settings", {}), opts)
    if msg:
        raise PreprocessError(msg)
    if inputs_total is not None and old.get("inputs_total") != inputs_total:
        raise PreprocessError(f"the input changed since {out} was started ({old.get('inputs_total')} inputs "
                              f"then, {inputs_total} in its plan now); use another --out or --overwrite")


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


def chunk_summary(rec: dict) -> dict[str, int]:
    """What an engine reports back to the driver for a committed chunk (errors stay in the sidecar)."""
    return {k: rec.get(k, 0) for k in ("chunk", "inputs", "written", "skipped")}


def _init_worker(opts: PreprocessOptions, counter, progress_queue, workers: int) -> None:
    import torch

    from data_pipeline.worker import ChunkProcessor

    with counter.get_lock():
        wid = counter.value
        counter.value += 1
    # Share the machine's cores between the workers instead of oversubscribing them.
    torch.set_num_threads(max(1, _cpus() // workers))
    _WORKER["proc"] = ChunkProcessor(opts, device=_pick_device(opts, wid, workers))
    _WORKER["plan"] = Plan.load(opts.out)
    _WORKER["queue"] = progress_queue


def _run_chunk(chunk: int) -> dict:
    q = _WORKER["queue"]
    first, items = _WORKER["plan"].chunk_items(chunk)  # each worker reads its chunk's inputs itself
    return chunk_summary(_WORKER["proc"].process_chunk(chunk, first, items, progress=lambda n, w: q.put((n, w))))


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


# ------------------------------------------------------------------------------ the run
def run_preprocess(opts: PreprocessOptions, codecs: Optional[dict] = None, verbose: bool = True) -> dict[str, Any]:
    """Run (or resume) preprocessing for this rank and return the aggregated ``stats.json`` content.

    Args:
        opts: run settings (validated here; :class:`PreprocessError` before any work on a bad one).
        codecs: already-built codecs by modality, used when running in-process (``workers == 1``,
            local engine); missing ones are loaded from ``opts.codecs`` / tiny.  Worker processes
            and Ray actors always build their own from ``opts.codecs`` (save a codec with
            ``codec.save(DIR/<modality>)`` to give them a custom one).
        verbose: log the plan line and the summary table (to stderr).
    """
    log = _log if verbose else (lambda msg: None)
    t_start = time.time()
    opts.validate()
    rank, world, where = resolve_rank(opts.rank, opts.world_size, os.environ)
    if opts.overwrite and world > 1:
        raise PreprocessError("--overwrite with several ranks would let them delete each other's shards; "
                              "clear OUT once before launching the ranks")
    if opts.engine == "ray":
        from data_pipeline.ray_engine import import_ray

        import_ray()  # a missing extra fails here, before any file is written
    out = Path(opts.out)
    if not opts.overwrite:
        _check_run_file(out, opts)

    def needed_codecs(modalities: dict[str, int]) -> list[str]:
        return [m for m in sorted(modalities) if not (codecs and m in codecs)]

    # Pass 1 happens once per output directory (the plan); every check in `check` still runs before
    # a new plan is committed, and a run that fails there leaves no OUT behind.
    plan, _ = obtain_plan(out, opts, world, lambda: _limited(build_reader(opts), opts.limit),
                          lambda mods: _preflight_codecs(opts, needed_codecs(mods), mods), log)
    inputs_total, n_chunks = plan.inputs_total, plan.chunks_total
    if not opts.overwrite:
        _check_run_file(out, opts, inputs_total)
    needed = needed_codecs(plan.modalities)

    mine = owned_chunks(n_chunks, rank, world)
    done = set() if opts.overwrite else {c for c in mine if read_sidecar(out, opts.prefix, c) is not None}
    pending = [c for c in mine if c not in done]
    in_process = opts.engine == "local" and (opts.workers <= 1 or len(pending) <= 1)
    proc = None
    if in_process and pending:
        from data_pipeline.worker import ChunkProcessor

        proc = ChunkProcessor(opts, codecs=codecs, device=_pick_device(opts, 0, 1))
        for m in needed:  # a checkpoint that does not load fails now, not after the first shard
            proc.codec(m)

    # From here on the output directory is written (beyond the plan).
    if opts.overwrite:
        clear_outputs(out, opts.prefix)
    _write_run_file(out, opts, inputs_total, n_chunks)
    for c in pending:
        remove_chunk_files(out, opts.prefix, c)
    pending_inputs = sum(plan.chunk_inputs(c) for c in pending)
    how = "engine ray" if opts.engine == "ray" else f"{1 if in_process else opts.workers} worker(s)"
    log(f"[rank {rank}/{world}, from {where}] {opts.source}: {inputs_total} inputs, {n_chunks} chunks of "
        f"{opts.shard_size}; this rank: {len(mine)} chunks, {len(done)} already done, {len(pending)} to do "
        f"({pending_inputs} inputs), {how}")

    bar = _progress_bar(opts, pending_inputs, rank)
    written_here = 0
    t_work = time.time()

    def tick(n: int, w: int) -> None:
        nonlocal written_here
        written_here += w
        bar.update(n)
        bar.set_postfix(written=written_here, refresh=False)

    try:
        if proc is not None:
            for c, first, items in plan.iter_chunks(pending):
                proc.process_chunk(c, first, items, progress=tick)
        elif pending and opts.engine == "ray":
            from data_pipeline.ray_engine import run_ray

            run_ray(opts, pending, needed, on_chunk=lambda r: tick(r["inputs"], r["written"]), log=log)
        elif pending:
            written_here = _run_pool(opts, pending, bar)
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


def _run_pool(opts: PreprocessOptions, chunks: list[int], bar) -> int:
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

        for chunk in chunks:
            collect(max_in_flight - 1)
            in_flight.add(ex.submit(_run_chunk, chunk))
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


# ------------------------------------------------------------------------------ --status
def compress_ranks(ranks: list[int]) -> str:
    """``[0, 1, 2, 3, 7, 9, 10]`` -> ``"0-3,7,9-10"`` (a SLURM ``--array=`` expression)."""
    parts: list[str] = []
    rs = sorted(set(ranks))
    i = 0
    while i < len(rs):
        j = i
        while j + 1 < len(rs) and rs[j + 1] == rs[j] + 1:
            j += 1
        parts.append(str(rs[i]) if i == j else f"{rs[i]}-{rs[j]}")
        i = j + 1
    return ",".join(parts)


def _chunk_list(chunks: list[int], limit: int = 8) -> str:
    shown = ", ".join(str(c) for c in chunks[:limit])
    return shown + (f", ... ({len(chunks) - limit} more)" if len(chunks) > limit else "")


def run_status(out: Path, world_size: Optional[int] = None, print_fn: Callable[[str], None] = print) -> int:
    """``--status``: done/pending chunks per rank and the ranks to resubmit; no work is done.

    The world size is ``world_size``, else the one recorded in the plan by the latest run.
    Returns the exit code: 0 when every chunk is finished, 3 when work is pending (also when no
    rank has started yet).
    """
    out = Path(out)
    plan = Plan.load(out)
    if plan is None:
        print_fn(f"{out}: no plan yet (no rank has started): everything is pending")
        if world_size:
            print_fn(f"pending ranks: --array={compress_ranks(list(range(world_size)))}")
        return 3
    world = world_size or plan.world_size or 1
    prefix = plan.prefix
    stats, _ = aggregate(out, prefix, plan.chunks_total, plan.inputs_total)
    finished = {c for c in range(plan.chunks_total) if read_sidecar(out, prefix, c) is not None}
    src = "given" if world_size else "from the plan"
    print_fn(f"{out}: {plan.inputs_total} inputs in {plan.chunks_total} chunks of {plan.shard_size}; "
             f"world size {world} ({src})")
    print_fn(f"{'rank':>6}  {'done':>6}  {'pending':>7}  pending chunks")
    pending_ranks = []
    for r in range(world):
        mine = owned_chunks(plan.chunks_total, r, world)
        todo = [c for c in mine if c not in finished]
        if todo:
            pending_ranks.append(r)
        print_fn(f"{r:>6}  {len(mine) - len(todo):>6}  {len(todo):>7}  {_chunk_list(todo)}")
    print_fn(f"chunks: {len(finished)}/{plan.chunks_total} done; samples: {stats['written']} written, "
             f"{stats['skipped']} skipped so far ({stats['inputs']}/{plan.inputs_total} inputs)")
    if not pending_ranks:
        print_fn("complete: nothing to resubmit")
        return 0
    print_fn(f"pending ranks: --array={compress_ranks(pending_ranks)}  (resubmit those array ids with "
             f"--world-size {world}: ids are then ranks)")
    return 3


__all__ = ["run_preprocess", "run_status", "compress_ranks", "owned_chunks", "clear_outputs", "chunk_summary",
           "RUN_FILE"]
