"""Counter-based randomness and weighted source mixing.

Every random decision of the loader is ``f(seed, stream id, counter)``: no generator state to
save, the same answer in any process, and a restore only needs the counters.
"""
from __future__ import annotations

import zlib
from typing import Sequence

import numpy as np

_MASK = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def hash_ints(*values: int) -> int:
    """A 64-bit hash of a tuple of integers (stable across processes and Python versions)."""
    h = 0x243F6A8885A308D3
    for v in values:
        h = _splitmix64(h ^ (int(v) & _MASK))
    return h


def name_id(name: str) -> int:
    """A stable integer for a source name (``hash()`` of a str is salted per process)."""
    return zlib.crc32(name.encode("utf-8"))


def uniform(*values: int) -> float:
    """A float in [0, 1) determined by the integers."""
    return (hash_ints(*values) >> 11) * (1.0 / (1 << 53))


def seeded_rng(*values: int) -> np.random.Generator:
    return np.random.default_rng(hash_ints(*values))


class Mixer:
    """Draw ``n`` picks source ``i`` with probability ``weights[i] / sum(weights)``.

    Draws are a pure function of ``(seed, rank, n)``; the state is just ``n``.
    """

    def __init__(self, weights: Sequence[float], seed: int, rank: int = 0):
        w = np.asarray(weights, dtype=np.float64)
        if w.ndim != 1 or len(w) == 0 or np.any(w <= 0) or not np.all(np.isfinite(w)):
            raise ValueError(f"mixing weights must be positive and finite, got {list(weights)}")
        self.cum = np.cumsum(w / w.sum())
        self.cum[-1] = 1.0
        self.seed = int(seed)
        self.rank = int(rank)
        self.draws = 0

    def next(self) -> int:
        u = uniform(self.seed, 0x6D6978, self.rank, self.draws)
        self.draws += 1
        return int(np.searchsorted(self.cum, u, side="right"))

    def state_dict(self) -> dict:
        return {"draws": self.draws}

    def load_state_dict(self, state: dict) -> None:
        self.draws = int(state["draws"])
