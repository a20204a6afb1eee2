"""``--engine ray``: this rank's pending chunks on a Ray cluster (the optional ``ray`` extra).

The planning, ownership, resume and accounting are the local engine's (:mod:`data_pipeline.runner`);
only who runs a chunk changes.  One actor per GPU of the cluster (``num_gpus=1`` each), else
``--workers`` actors of ``--ray-actor-cpus`` CPUs each, wraps the same
:class:`~data_pipeline.worker.ChunkProcessor` as a local worker.  The driver hands out chunk
*numbers* (at most two in flight per actor); an actor reads its chunk's inputs from the plan and
writes the shard and its sidecar itself with our writer, so shard names and bytes are those of the
local engine and a rerun resumes from the sidecars whichever engine wrote them.  Ray Data's
``write_webdataset`` is deliberately not used: it writes random file names and mtimes.

Retries: an actor that dies (node lost, OOM kill) is restarted (``max_restarts``) and its pending
chunks are retried (``max_task_retries``).  A retry is safe because a chunk is a pure function of
its inputs: a chunk already committed is returned as is, a half-written one is cleared and redone.
An exception raised *inside* a chunk (a codec that cannot be built) is a setup error and fails
the run, as with the local engine.

On a multi-node cluster ``--out`` (and the plan in it) and the media must be on storage every node
sees, and every node needs this package installed (or a ``runtime_env``).  ``ray`` is imported
only here, only when the engine is used.
"""
from __future__ import annotations

from collections import deque
from typing import Any, Callable

from data_pipeline.options import PreprocessError, PreprocessOptions
from data_pipeline.plan import Plan
from data_pipeline.runner import chunk_summary
from data_pipeline.shards import read_sidecar, remove_chunk_files

MAX_RESTARTS = 3
MAX_TASK_RETRIES = 3
IN_FLIGHT_PER_ACTOR = 2


class ChunkActor:
    """A Ray actor around one :class:`~data_pipeline.worker.ChunkProcessor` (plain class; ``ray.remote`` wraps it)."""

    def __init__(self, opts: PreprocessOptions, needed: list[str], threads: int, gpu: bool):
        import torch

        from data_pipeline.worker import ChunkProcessor

        torch.set_num_threads(max(1, threads))
        # Ray sets CUDA_VISIBLE_DEVICES to the actor's GPU, so it is always cuda:0 here.
        device = "cuda:0" if gpu else ("cpu" if opts.device == "auto" else opts.device)
        self.opts = opts
        self.proc = ChunkProcessor(opts, device=device)
        for m in needed:  # a codec that does not load fails the actor now, not mid-chunk
            self.proc.codec(m)
        self.plan = Plan.load(opts.out)
        if self.plan is None:
            raise PreprocessError(f"{opts.out}: no plan visible from this node (is --out on shared storage?)")

    def run(self, chunk: int) -> dict[str, int]:
        """Process ``chunk`` and commit it; a retry of a committed chunk returns its record unchanged."""
        rec = read_sidecar(self.opts.out, self.opts.prefix, chunk)
        if rec is None:
            remove_chunk_files(self.opts.out, self.opts.prefix, chunk)  # a killed attempt's leftovers
            first, items = self.plan.chunk_items(chunk)
            rec = self.proc.process_chunk(chunk, first, items)
        return chunk_summary(rec)


def import_ray():
    """The ``ray`` module, or a one-line :class:`PreprocessError` saying how to install it."""
    try:
        import ray
    except ImportError:
        raise PreprocessError("--engine ray needs Ray: pip install 'anygpt-trainer[ray]' (ray>=2.40)") from None
    return ray


def run_ray(opts: PreprocessOptions, chunks: list[int], needed: list[str],
            on_chunk: Callable[[dict[str, int]], None], log: Callable[[str], None]) -> int:
    """Run ``chunks`` on Ray actors; ``on_chunk`` gets each finished chunk's counts.  Returns samples written.

    Connects to ``opts.ray_address`` (else ``RAY_ADDRESS``, else starts a local instance) unless Ray
    is already initialised in this process (then that instance is used and left running).
    """
    ray = import_ray()
    started = not ray.is_initialized()
    if started:
        ray.init(address=opts.ray_address, include_dashboard=False, log_to_driver=True)
    actors: list[Any] = []
    try:
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0)) if opts.device in ("auto", "cuda") else 0
        n = max(1, min(gpus or opts.workers, len(chunks)))
        options: dict[str, Any] = {"num_cpus": opts.ray_actor_cpus, "max_restarts": MAX_RESTARTS,
                                   "max_task_retries": MAX_TASK_RETRIES}
        if gpus:
            options["num_gpus"] = 1
        log(f"ray: {n} actor(s) ({'1 GPU' if gpus else 'no GPU'}, {opts.ray_actor_cpus:g} CPU each) on a cluster "
            f"of {resources.get('CPU', 0):g} CPUs / {gpus} GPUs")
        remote_cls = ray.remote(**options)(ChunkActor)
        threads = max(1, int(opts.ray_actor_cpus))
        actors = [remote_cls.remote(opts, needed, threads, bool(gpus)) for _ in range(n)]
        todo = deque(chunks)
        in_flight: dict[Any, tuple[Any, int]] = {}

        def submit(actor: Any) -> None:
            if todo:
                c = todo.popleft()
                in_flight[actor.run.remote(c)] = (actor, c)

        for actor in actors:
            for _ in range(IN_FLIGHT_PER_ACTOR):
                submit(actor)
        written = 0
        while in_flight:
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            for ref in ready:
                actor, c = in_flight.pop(ref)
                try:
                    rec = ray.get(ref)
                except ray.exceptions.RayError as e:
                    cause = getattr(e, "cause", None) or e
                    first = str(cause).strip().splitlines()
                    msg = first[-1] if first else type(cause).__name__
                    raise RuntimeError(f"ray: chunk {c} failed ({msg}); finished shards are kept, "
                                       "rerun the same command to resume") from None
                written += rec["written"]
                on_chunk(rec)
                submit(actor)
        return written
    finally:
        for actor in actors:
            ray.kill(actor)
        if started:
            ray.shutdown()


__all__ = ["run_ray", "import_ray", "ChunkActor", "MAX_RESTARTS", "MAX_TASK_RETRIES"]
