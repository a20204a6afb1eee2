"""Fault injection for tests of the failure paths (kill, killed save, non-finite loss).

``ANYGPT_TRAIN_FAULTS`` holds comma-separated ``KIND@STEP`` or ``KIND@STEP:RANK`` items:

- ``kill_after_step@K``   SIGKILL this process right after optimizer step K (and its save, if any);
- ``kill_during_save@K``  SIGKILL after the DeepSpeed shards of checkpoint K are written, before it
  is marked complete and before the ``latest`` pointer moves;
- ``nan_loss@K``          make the loss of step K non-finite (exercises skip + logging + streak stop).

Without a rank every rank acts.  Nothing here runs unless the variable is set.
"""
from __future__ import annotations

import os
import signal
import sys

ENV = "ANYGPT_TRAIN_FAULTS"
KINDS = ("kill_after_step", "kill_during_save", "nan_loss")


class Faults:
    def __init__(self, spec: str | None, rank: int):
        self.items: set[tuple[str, int]] = set()
        for item in filter(None, (s.strip() for s in (spec or "").split(","))):
            kind, _, where = item.partition("@")
            step, _, only_rank = where.partition(":")
            if kind not in KINDS or not step.isdigit():
                raise ValueError(f"{ENV}: bad item {item!r} (expected KIND@STEP[:RANK], KIND in {KINDS})")
            if only_rank == "" or int(only_rank) == rank:
                self.items.add((kind, int(step)))

    @classmethod
    def from_env(cls, rank: int) -> "Faults":
        return cls(os.environ.get(ENV), rank)

    def active(self, kind: str, step: int) -> bool:
        return (kind, step) in self.items

    def maybe(self, kind: str, step: int) -> None:
        """SIGKILL this process when ``kind@step`` is armed (for the kill kinds)."""
        if self.active(kind, step):
            sys.stdout.flush()
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)
