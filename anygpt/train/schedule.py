"""Learning-rate schedule: linear warmup, then cosine decay from ``optim.lr`` to ``optim.min_lr``."""
from __future__ import annotations

import math
from typing import Callable

import torch


def lr_at(step: int, lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Learning rate of optimizer update number ``step`` (0-based).

    Warmup reaches ``lr`` on its last step (``(step + 1) / warmup``) so no update runs at lr 0;
    the cosine then ends at ``min_lr`` on the last step of the run.
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    span = max(1, max_steps - warmup_steps - 1)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def scheduler_factory(lr: float, min_lr: float, warmup_steps: int,
                      max_steps: int) -> Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LambdaLR]:
    """A callable for ``deepspeed.initialize(lr_scheduler=...)``.

    DeepSpeed calls it with the optimizer it actually steps (the ZeRO wrapper's groups), and steps the
    schedule only when an update was applied: a step skipped for a non-finite loss does not move it.
    The lambda is a closure, so the scheduler's state dict stays ``{last_epoch, base_lrs, ...}`` and
    resumes exactly.
    """
    def factor(step: int) -> float:
        return lr_at(step, lr, min_lr, warmup_steps, max_steps) / lr

    return lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
