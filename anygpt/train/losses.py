"""Next-token loss with a breakdown by target modality and by task (direction).

One pass of ``cross_entropy(reduction="none")`` gives the training loss and, via two ``bincount``s,
the sums that the log line, ``metrics.jsonl`` and the evaluation report per modality
(``text``/``image``/``speech``/``music``: which kind of token is being predicted) and per task
(``image2text``, ``text2speech``, ..., ``sft``: the loader's per-token ``tasks`` ids).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

IGNORE = -100


class TokenLoss:
    """Callable ``(logits, labels, tasks) -> (mean loss, stats, bad_rows)``.

    ``stats`` is a float64 tensor ``[2, M + T]``: row 0 loss sums, row 1 token counts, columns the
    ``modalities`` then the ``tasks`` names; summing it over micro-batches and ranks (all_reduce) and
    dividing gives exact token-weighted means.
    """

    def __init__(self, layout: Any, task_names: list[str] | tuple[str, ...], device: torch.device):
        self.modalities = ["text", *layout.modalities]
        self.tasks = list(task_names)
        size = max(layout.total, max(m.stop for m in layout.modalities.values()))
        table = torch.zeros(size, dtype=torch.long)  # 0 = text and special tokens
        for i, spec in enumerate(layout.modalities.values(), start=1):
            table[spec.offset:spec.stop] = i
        self.table = table.to(device)
        self.width = len(self.modalities) + len(self.tasks)

    def zeros(self) -> torch.Tensor:
        return torch.zeros(2, self.width, dtype=torch.float64, device=self.table.device)

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor,
                 tasks: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        # Hugging Face alignment: logits at t predict labels[t + 1].  Shift the labels (pad the end with
        # IGNORE) rather than slice the logits: a sliced [B, L-1, V] view would be copied whole, twice
        # counting its gradient, and the logits are the largest tensor of the step.
        target = F.pad(labels[:, 1:], (0, 1), value=IGNORE).to(logits.device)
        b, t, v = logits.shape
        ce = F.cross_entropy(logits.float().reshape(-1, v), target.reshape(-1), ignore_index=IGNORE,
                             reduction="none").view(b, t)
        valid = target != IGNORE
        n = valid.sum()
        loss = ce.sum() / n.clamp(min=1)
        with torch.no_grad():
            row_sum = ce.sum(dim=1)
            bad_rows = [i for i in range(b) if not torch.isfinite(row_sum[i])]
            flat_ce = ce[valid].double()
            stats = self.zeros()
            mod = self.table[target[valid].clamp(0, self.table.numel() - 1)]
            m = len(self.modalities)
            stats[0, :m] = torch.bincount(mod, weights=flat_ce, minlength=m)[:m]
            stats[1, :m] = torch.bincount(mod, minlength=m)[:m].double()
            if tasks is not None:
                task = F.pad(tasks[:, 1:], (0, 1)).to(logits.device)[valid].clamp(0, len(self.tasks) - 1)
                stats[0, m:] = torch.bincount(task, weights=flat_ce, minlength=len(self.tasks))[:len(self.tasks)]
                stats[1, m:] = torch.bincount(task, minlength=len(self.tasks))[:len(self.tasks)].double()
        return loss, stats, bad_rows

    def summarize(self, stats: torch.Tensor) -> tuple[dict[str, float], dict[str, float]]:
        """Per-modality and per-task mean losses (names with no tokens are left out)."""
        sums, counts = stats[0].tolist(), stats[1].tolist()
        m = len(self.modalities)
        by_mod = {name: sums[i] / counts[i] for i, name in enumerate(self.modalities) if counts[i] > 0}
        by_task = {name: sums[m + i] / counts[m + i] for i, name in enumerate(self.tasks)
                   if counts[m + i] > 0 and name != "pad"}
        return by_mod, by_task
