"""The training loader (infinite, mixed, packed, exactly resumable) and the held-out eval loader."""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import sys
import time
from collections import Counter
from typing import Any

from anygpt.data.examples import Example, ExampleBuilder, Skip, SourceSpec, _init_worker
from anygpt.data.mixing import Mixer
from anygpt.data.packing import Packer, collate_rows, pack_examples
from anygpt.data.shards import ShardError, expand_shards, iter_shard_samples
from anygpt.data.streams import DataError, Position, ShardPlan, SourceStream

log = logging.getLogger(__name__)

STATE_VERSION = 1
_LOG_FIRST = 20  # per reason, then every 1000th


def _pad_id(tokenizer: Any) -> int:
    for tid in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "unk_token_id", None),
                getattr(tokenizer, "eos_token_id", None)):
        if tid is not None:
            return int(tid)
    return 0


class _SkipLog:
    """Counts skipped samples by reason and logs them with their key (rate-limited)."""

    def __init__(self, what: str):
        self.what = what
        self.by_reason: Counter = Counter()
        self.recent: list[str] = []

    def add(self, item: Skip) -> None:
        self.by_reason[item.reason] += 1
        n = self.by_reason[item.reason]
        self.recent = (self.recent + [f"{item.key}: {item.reason}"])[-20:]
        if n <= _LOG_FIRST or n % 1000 == 0:
            log.warning("%s: skipped sample %s (%s%s) [%d skipped for this reason]", self.what, item.key,
                        item.reason, f": {item.detail}" if item.detail else "", n)

    @property
    def total(self) -> int:
        return sum(self.by_reason.values())


class TrainLoader:
    """Infinite iterator of packed batches for one rank; see :mod:`anygpt.data` for the contract."""

    def __init__(self, cfg: Any, tokenizer: Any, layout: Any, rank: int = 0, world_size: int = 1, *,
                 batch_size: int | None = None, seed: int | None = None, num_workers: int | None = None,
                 overlong: str = "skip", attention: str = "4d", pack_buffer: int = 64,
                 mp_context: str | None = None):
        data = cfg.data
        if not data.sources:
            raise ValueError("data.sources: at least one source is required")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if attention not in ("4d", "segments"):
            raise ValueError(f"attention must be '4d' or 'segments', not {attention!r}")
        self.rank, self.world_size = int(rank), int(world_size)
        self.seq_len = int(data.seq_len)
        self.batch_size = int(batch_size or cfg.optim.micro_batch_size)
        self.seed = int(cfg.run.seed if seed is None else seed)
        self.num_workers = int(data.num_workers if num_workers is None else num_workers)
        self.attention = attention
        self.block_size = max(1, int(data.shuffle_buffer))
        self.pad_id = _pad_id(tokenizer)
        self.mp_context = mp_context
        self.specs = [SourceSpec(s.name, s.kind, float(s.x2text_prob)) for s in data.sources]
        self.plans = []
        for i, s in enumerate(data.sources):
            try:
                shards = expand_shards(s.shards)
            except ShardError as e:
                raise ShardError(f"data.sources[{i}].shards ({s.name}): {e}") from None
            self.plans.append(ShardPlan(shards, s.name, self.seed, self.rank, self.world_size))
        self.builder = ExampleBuilder(tokenizer, layout, self.seq_len, loss=data.loss,
                                      system_prompt=data.system_prompt, seed=self.seed, overlong=overlong)
        self.mixer = Mixer([s.weight for s in data.sources], self.seed, self.rank)
        self.packer = Packer(self.seq_len, pack_buffer)
        self._positions = [Position() for _ in self.specs]
        self._streams: list[SourceStream] | None = None
        self._pool = None
        self._reset_counters()

    # ------------------------------------------------------------------ counters
    def _reset_counters(self) -> None:
        self.batches = 0
        self.rows = 0
        self.tokens = 0
        self.target_tokens = 0
        self.examples = Counter()  # per source
        self.tasks = Counter()  # per task name
        self.skips = _SkipLog(f"rank {self.rank}")
        self.skips_by_source: Counter = Counter()
        self.read_seconds = 0.0

    def stats(self) -> dict:
        slots = self.rows * self.seq_len
        bad = {}
        for st in self._streams or []:
            bad.update(st.bad_shards)
        return {
            "batches": self.batches,
            "rows": self.rows,
            "tokens": self.tokens,
            "target_tokens": self.target_tokens,
            "packing_efficiency": self.tokens / slots if slots else 0.0,
            "examples": dict(self.examples),
            "examples_total": sum(self.examples.values()),
            "tasks": dict(self.tasks),
            "skipped": self.skips.total,
            "skipped_by_reason": dict(self.skips.by_reason),
            "skipped_by_source": dict(self.skips_by_source),
            "recent_skips": list(self.skips.recent),
            "bad_shards": bad,
            "lost_samples": sum(st.lost_samples for st in self._streams or []),
            "epochs": {spec.name: pos.epoch for spec, pos in zip(self.specs, self._current_positions())},
            "read_seconds": self.read_seconds,
        }

    # ------------------------------------------------------------------ streams
    def _make_pool(self):
        if self.num_workers <= 0:
            return None
        if self._pool is None:
            method = self.mp_context or ("fork" if sys.platform.startswith("linux") else "spawn")
            # Forking after the Rust tokenizer ran makes it warn and disable its own threads anyway.
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            self._pool = mp.get_context(method).Pool(self.num_workers, initializer=_init_worker,
                                                     initargs=(self.builder,))
        return self._pool

    def _ensure_streams(self) -> list[SourceStream]:
        if self._streams is None:
            pool = self._make_pool()
            self._streams = [
                SourceStream(spec, plan, self.builder, self.block_size, self.seed, start=pos, pool=pool,
                             prefetch=2 * max(1, self.num_workers))
                for spec, plan, pos in zip(self.specs, self.plans, self._positions)
            ]
        return self._streams

    def _current_positions(self) -> list[Position]:
        if self._streams is None:
            return list(self._positions)
        return [s.position for s in self._streams]

    def _pull(self) -> Example:
        streams = self._ensure_streams()
        i = self.mixer.next()
        stream = streams[i]
        while True:
            item, _ = stream.next_item()
            if isinstance(item, Skip):
                self.skips.add(item)
                self.skips_by_source[self.specs[i].name] += 1
                continue
            self.examples[self.specs[i].name] += 1
            self.tasks[self.builder.task_names[item.task]] += 1
            return item

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> "TrainLoader":
        return self

    def __next__(self) -> dict:
        t0 = time.perf_counter()
        rows = [self.packer.next_row(self._pull) for _ in range(self.batch_size)]
        batch = collate_rows(rows, self.seq_len, self.pad_id, self.attention)
        self.batches += 1
        self.rows += len(rows)
        self.tokens += sum(len(ex) for row in rows for ex in row)
        self.target_tokens += int((batch["labels"] != -100).sum())
        self.read_seconds += time.perf_counter() - t0
        return batch

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """JSON-serialisable position after the last batch returned (per rank: save one per rank)."""
        return {
            "version": STATE_VERSION,
            "rank": self.rank,
            "world_size": self.world_size,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "sources": {
                spec.name: {**pos.to_dict(), "num_shards": len(plan.shards)}
                for spec, plan, pos in zip(self.specs, self.plans, self._current_positions())
            },
            "mixer": self.mixer.state_dict(),
            "packer": self.packer.state_dict(),
            "counters": {
                "batches": self.batches, "rows": self.rows, "tokens": self.tokens,
                "target_tokens": self.target_tokens, "examples": dict(self.examples), "tasks": dict(self.tasks),
                "skipped_by_reason": dict(self.skips.by_reason), "skipped_by_source": dict(self.skips_by_source),
            },
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a position saved by :meth:`state_dict` (same rank, world size, seed, seq_len, sources)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r} is not {STATE_VERSION}")
        for key, mine in (("world_size", self.world_size), ("rank", self.rank), ("seed", self.seed),
                          ("seq_len", self.seq_len)):
            if state.get(key) != mine:
                raise ValueError(f"loader state was saved with {key}={state.get(key)!r}, this run has {mine!r}: "
                                 "the data order would differ (exact resume needs the same value)")
        saved = state["sources"]
        names = [s.name for s in self.specs]
        if sorted(saved) != sorted(names):
            raise ValueError(f"loader state has sources {sorted(saved)}, config has {sorted(names)}")
        for spec, plan in zip(self.specs, self.plans):
            if saved[spec.name].get("num_shards") != len(plan.shards):
                raise ValueError(f"source {spec.name}: state saved with {saved[spec.name].get('num_shards')} shards, "
                                 f"now {len(plan.shards)} (the shard list changed)")
        self._close_streams()
        self._positions = [Position.from_dict(saved[spec.name]) for spec in self.specs]
        self.mixer.load_state_dict(state["mixer"])
        self.packer.load_state_dict(state["packer"])
        c = state.get("counters", {})
        self._reset_counters()
        self.batches, self.rows = int(c.get("batches", 0)), int(c.get("rows", 0))
        self.tokens, self.target_tokens = int(c.get("tokens", 0)), int(c.get("target_tokens", 0))
        self.examples.update(c.get("examples", {}))
        self.tasks.update(c.get("tasks", {}))
        self.skips.by_reason.update(c.get("skipped_by_reason", {}))
        self.skips_by_source.update(c.get("skipped_by_source", {}))

    # ------------------------------------------------------------------ cleanup
    def _close_streams(self) -> None:
        if self._streams is not None:
            self._positions = [s.position for s in self._streams]
            for s in self._streams:
                s.close()
            self._streams = None
        if self._pool is not None:  # in-flight chunks belong to the old position: drop them
            self._pool.terminate()
            self._pool.join()
            self._pool = None

    def close(self) -> None:
        self._close_streams()

    def __enter__(self) -> "TrainLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            if self._pool is not None:
                self._pool.terminate()
        except Exception:
            pass


class EvalLoader:
    """Finite held-out batches; every rank yields the same number (padded with empty rows)."""

    def __init__(self, cfg: Any, tokenizer: Any, layout: Any, rank: int = 0, world_size: int = 1, *,
                 shards: str | None = None, batch_size: int | None = None, loss: str = "assistant",
                 attention: str = "4d", overlong: str = "skip", pack_buffer: int = 64):
        spec = shards if shards is not None else cfg.data.eval_shards
        if not spec:
            raise ValueError("data.eval_shards: not set (no held-out shards to evaluate on)")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if loss not in ("assistant", "all"):
            raise ValueError(f"loss must be 'assistant' or 'all', not {loss!r}")
        self.shards = expand_shards(spec)
        self.rank, self.world_size = int(rank), int(world_size)
        self.seq_len = int(cfg.data.seq_len)
        self.batch_size = int(batch_size or cfg.optim.micro_batch_size)
        self.loss = loss
        self.attention = attention
        self.pack_buffer = pack_buffer
        self.pad_id = _pad_id(tokenizer)
        self.builder = ExampleBuilder(tokenizer, layout, self.seq_len, loss=loss,
                                      system_prompt=cfg.data.system_prompt, seed=0, overlong=overlong)
        self._num_batches: int | None = None
        self.last_stats: dict = {}
        self._logged_bad: set[str] = set()  # damaged shards already logged (every pass reads them again)

    def _examples(self, skips: _SkipLog, tasks: Counter, bad: dict, lost: Counter):
        for url in self.shards:
            try:
                for raw in iter_shard_samples(url):
                    out = self.builder.build_eval(raw, "eval", self.loss)
                    if isinstance(out, Skip):
                        skips.add(out)
                        continue
                    for ex in out:
                        tasks[self.builder.task_names[ex.task]] += 1
                        yield ex
            except ShardError as e:
                bad[url] = str(e)
                lost["samples"] += e.lost or 0
                if url not in self._logged_bad:
                    self._logged_bad.add(url)
                    log.error("eval: damaged shard, going on: %s", e)

    def __iter__(self):
        return self._batches(collate=True)

    def _batches(self, collate: bool):
        skips, tasks, bad, lost = _SkipLog(f"eval rank {self.rank}"), Counter(), {}, Counter()
        group_size = self.world_size * self.batch_size
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        group: list[list[Example]] = []
        n = rows = tokens = 0
        for row in pack_examples(self._examples(skips, tasks, bad, lost), self.seq_len, self.pack_buffer):
            group.append(row)
            rows += 1
            tokens += sum(len(ex) for ex in row)
            if len(group) == group_size:
                n += 1
                yield collate_rows(group[lo:hi], self.seq_len, self.pad_id, self.attention) if collate else None
                group = []
        if group:
            group += [[] for _ in range(group_size - len(group))]
            n += 1
            yield collate_rows(group[lo:hi], self.seq_len, self.pad_id, self.attention) if collate else None
        self._num_batches = n
        self.last_stats = {"batches": n, "rows": rows, "examples": sum(tasks.values()), "tasks": dict(tasks),
                           "skipped": skips.total, "skipped_by_reason": dict(skips.by_reason),
                           "bad_shards": bad, "lost_samples": lost["samples"],
                           "packing_efficiency": tokens / (rows * self.seq_len) if rows else 0.0}

    def __len__(self) -> int:
        """Batches per pass (identical on every rank); counted by a dry pass if not yet known."""
        if self._num_batches is None:
            for _ in self._batches(collate=False):
                pass
        return int(self._num_batches or 0)


def build_train_loader(cfg: Any, tokenizer: Any, layout: Any, rank: int = 0, world_size: int = 1,
                       **kwargs: Any) -> TrainLoader:
    """The stage's training loader for one rank (see :mod:`anygpt.data` for options and batch format)."""
    return TrainLoader(cfg, tokenizer, layout, rank, world_size, **kwargs)


def build_eval_loader(cfg: Any, tokenizer: Any, layout: Any, rank: int = 0, world_size: int = 1,
                      **kwargs: Any) -> EvalLoader:
    """Held-out loader over ``data.eval_shards`` (or ``shards=``): one pass per ``iter()``."""
    return EvalLoader(cfg, tokenizer, layout, rank, world_size, **kwargs)


__all__ = ["TrainLoader", "EvalLoader", "build_train_loader", "build_eval_loader", "DataError"]
