"""Per-source, per-rank infinite sample streams with an exactly restorable position.

Position of a stream = ``(epoch, cursor, offset, taken)``:

- ``epoch``: pass over the source; each epoch has its own seeded shard order;
- ``cursor``: index into this rank's shard list for that epoch;
- ``offset``: samples (all tar samples, also other ranks' and bad ones) already read from that shard;
- ``taken``: samples already consumed from the shuffle block that starts at that position.

Shuffling is a seeded permutation of blocks of ``block_size`` consecutive own samples; a block is
re-read from its start on restore, so no buffered sample has to be saved.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
from collections import deque
from dataclasses import dataclass
from typing import Iterator

from anygpt.data.examples import Example, ExampleBuilder, Skip, SourceSpec, _build_chunk
from anygpt.data.mixing import name_id, seeded_rng
from anygpt.data.shards import ShardError, iter_shard_samples

log = logging.getLogger(__name__)
WORKER_TIMEOUT_S = 300.0


class DataError(RuntimeError):
    """The data cannot feed training (e.g. every sample of a source is unusable)."""


@dataclass(frozen=True)
class Position:
    epoch: int = 0
    cursor: int = 0
    offset: int = 0
    taken: int = 0

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "offset": self.offset, "taken": self.taken}

    @classmethod
    def from_dict(cls, d: dict) -> "Position":
        return cls(int(d["epoch"]), int(d["cursor"]), int(d["offset"]), int(d.get("taken", 0)))


class ShardPlan:
    """Which shards (and which samples in them) rank ``rank`` of ``world`` reads in an epoch.

    With ``len(shards) >= world``: rank ``r`` reads whole shards ``order[r::world]``.
    Otherwise every rank reads every shard and keeps sample ``j`` of the shard at epoch position
    ``p`` iff ``(p + j) % world == rank``.  Both cover every sample exactly once per epoch.
    """

    def __init__(self, shards: list[str], source: str, seed: int, rank: int = 0, world: int = 1):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside world size {world}")
        self.shards = list(shards)
        self.source = source
        self.seed = int(seed)
        self.rank = rank
        self.world = world
        self.by_shard = len(self.shards) >= world

    def order(self, epoch: int) -> list[int]:
        return seeded_rng(self.seed, name_id(self.source), 0x5348, epoch).permutation(len(self.shards)).tolist()

    def units(self, epoch: int) -> list[tuple[str, int | None]]:
        """``(url, p)`` per shard to read; ``p`` is None when the whole shard is ours."""
        order = self.order(epoch)
        if self.by_shard:
            return [(self.shards[i], None) for i in order[self.rank :: self.world]]
        return [(self.shards[i], p) for p, i in enumerate(order)]

    def mine(self, p: int | None, j: int) -> bool:
        return p is None or (p + j) % self.world == self.rank

    def read(self, epoch: int, cursor: int = 0, offset: int = 0,
             on_bad_shard=None) -> Iterator[tuple[dict, tuple[int, int, int]]]:
        """Own samples of an epoch from ``(cursor, offset)``, each with the position after it."""
        units = self.units(epoch)
        for c in range(cursor, len(units)):
            url, p = units[c]
            skip = offset if c == cursor else 0
            j = skip
            try:
                for raw in iter_shard_samples(url, skip):
                    if self.mine(p, j):
                        yield raw, (epoch, c, j + 1)
                    j += 1
            except ShardError as e:
                if on_bad_shard is not None:
                    on_bad_shard(url, e)


class SourceStream:
    """Infinite stream of rendered examples of one source for one rank.

    ``next_item()`` returns ``(Example | Skip, epoch)`` and advances :attr:`position` to the
    position *after* that item.  With a worker ``pool`` rendering runs there in chunks
    (read-ahead), but the position only advances with what was handed out.
    """

    def __init__(self, spec: SourceSpec, plan: ShardPlan, builder: ExampleBuilder, block_size: int,
                 seed: int, start: Position | None = None, pool=None, chunk: int = 8, prefetch: int = 4):
        self.spec = spec
        self.plan = plan
        self.builder = builder
        self.block_size = max(1, int(block_size))
        self.seed = int(seed)
        self.position = start or Position()
        self.pool = pool
        self.chunk = chunk
        self.prefetch = prefetch
        self.bad_shards: dict[str, str] = {}
        self.bad_shard_events = 0
        # Samples each damaged shard could not deliver (what its header says; 0 when unknown).  Per
        # shard, so re-reading it in a later epoch does not count the same loss again.
        self.lost_by_shard: dict[str, int] = {}
        self._gen = self._raw(self.position)
        self._ready: deque = deque()
        self._pending: deque = deque()
        self._skip_streak_epoch: int | None = None

    # ------------------------------------------------------------------ raw samples in order
    @property
    def lost_samples(self) -> int:
        return sum(self.lost_by_shard.values())

    def _on_bad_shard(self, url: str, error: ShardError) -> None:
        self.bad_shard_events += 1
        if url not in self.bad_shards:  # once per shard, however many epochs read it
            log.error("source %s: damaged shard, going on: %s", self.spec.name, error)
        self.bad_shards[url] = str(error)
        self.lost_by_shard[url] = max(self.lost_by_shard.get(url, 0), error.lost or 0)

    def _raw(self, start: Position) -> Iterator[tuple[dict, int, Position]]:
        epoch, cursor, offset, taken = start.epoch, start.cursor, start.offset, start.taken
        while True:
            from_epoch_start = cursor == 0 and offset == 0 and taken == 0
            gen = self.plan.read(epoch, cursor, offset, self._on_bad_shard)
            block_start = (epoch, cursor, offset)
            seen = 0
            while True:
                block = []
                exhausted = True
                for item in gen:
                    block.append(item)
                    if len(block) == self.block_size:
                        exhausted = False
                        break
                if not block:
                    break
                seen += len(block)
                end = (epoch + 1, 0, 0) if exhausted else block[-1][1]
                rng = seeded_rng(self.seed, name_id(self.spec.name), 0x424C, self.plan.rank, *block_start)
                perm = rng.permutation(len(block))
                for i in range(taken, len(block)):
                    after = Position(*block_start, i + 1) if i + 1 < len(block) else Position(*end, 0)
                    yield block[perm[i]][0], epoch, after
                taken = 0
                if exhausted:
                    break
                block_start = end
            if seen == 0 and from_epoch_start:
                detail = "; ".join(f"{u}: {m}" for u, m in list(self.bad_shards.items())[:3])
                raise DataError(f"source {self.spec.name}: rank {self.plan.rank}/{self.plan.world} found no "
                                f"readable samples in a whole epoch over {len(self.plan.shards)} shard(s)"
                                + (f" ({detail})" if detail else ""))
            epoch, cursor, offset, taken = epoch + 1, 0, 0, 0

    # ------------------------------------------------------------------ rendering
    def _submit(self) -> None:
        payload, positions = [], []
        for _ in range(self.chunk):
            raw, epoch, after = next(self._gen)
            payload.append((raw, self.spec, epoch))
            positions.append((epoch, after))
        self._pending.append((self.pool.apply_async(_build_chunk, (payload,)), positions))

    def next_item(self) -> tuple[Example | Skip, int]:
        if self.pool is None:
            raw, epoch, after = next(self._gen)
            item = self.builder.build(raw, self.spec, epoch)
        else:
            if not self._ready:
                while len(self._pending) < self.prefetch:
                    self._submit()
                result, positions = self._pending.popleft()
                try:
                    rendered = result.get(timeout=WORKER_TIMEOUT_S)
                except mp.TimeoutError:
                    raise DataError(f"source {self.spec.name}: a render worker gave no answer in "
                                    f"{WORKER_TIMEOUT_S} s (killed, e.g. out of memory?)") from None
                self._ready.extend(zip(rendered, positions))
                self._submit()
            item, (epoch, after) = self._ready.popleft()
        self.position = after
        if isinstance(item, Skip):
            if self._skip_streak_epoch is None:
                self._skip_streak_epoch = epoch
            elif epoch >= self._skip_streak_epoch + 2:  # a whole epoch went by without one good sample
                raise DataError(f"source {self.spec.name}: every sample of a whole epoch was skipped "
                                f"(last: {item.reason} {item.key} {item.detail})")
        else:
            self._skip_streak_epoch = None
        return item, epoch

    def close(self) -> None:
        self._gen.close()
        self._pending.clear()
        self._ready.clear()
