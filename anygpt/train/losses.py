"""Next-token loss with a breakdown by target modality and by task (direction), computed only where
there is a target.

Why only there: the LM head is the largest matrix multiply of a step once the vocabulary holds the
modality ranges (18k rows for a tiny model, 50k for LLaMA-2 + AnyGPT), and with response-only loss
(stage 2, or stage 1 with ``data.loss: assistant``) most positions -- prompts, inputs, padding -- have
no target.  :func:`logits_only_at` makes the model's own LM head run on the hidden states at the
target positions alone, so the logits are ``[N, V]`` instead of ``[B, L, V]``; the loss is the same
numbers.  Measured on 2 CPU cores, tiny model: ``anygpt bench train`` 2.3x per step at 26 % targets; the
demo's stage-1 step (2 ranks, ZeRO-3) went from ~0.8 s to ~0.48 s.

One pass of ``cross_entropy(reduction="none")`` gives the training loss and, via two ``bincount``s,
the sums that the log line, ``metrics.jsonl`` and the evaluation report per modality
(``text`` or a modality of the layout: which kind of token is being predicted) and per task
(``image2text``, ``text2speech``, ..., ``sft``: the loader's per-token ``tasks`` ids).  The held-out
loss (:func:`anygpt.eval.loss.heldout_loss`, used by the trainer's evaluation and ``anygpt eval``)
goes through the same :func:`lm_loss` and :class:`TokenLoss`, so both report the same numbers.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.nn.functional as F

IGNORE = -100


def target_positions(labels: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` bool: positions whose logits are scored (Hugging Face alignment: the logits at ``t``
    predict ``labels[t + 1]``, so the last position never is)."""
    return F.pad(labels[:, 1:] != IGNORE, (0, 1), value=False)


@contextlib.contextmanager
def logits_only_at(model: Any, positions: torch.Tensor) -> Iterator[None]:
    """Within the block, ``model``'s LM head sees only the hidden states at ``positions`` (``[B, L]``
    bool), so a forward returns logits ``[N, V]`` in row-major order of ``positions``.

    A forward pre-hook on the output embedding rather than a second forward path: the model, its
    parameter names and DeepSpeed's ZeRO-3 gathering hooks (registered on the same module, earlier,
    so they run first) stay exactly as they are; PEFT models forward ``get_output_embeddings``.
    """
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embedding (LM head) to restrict")

    def keep_targets(_module: Any, args: tuple) -> tuple:
        return (args[0][positions.to(args[0].device)], *args[1:])

    handle = head.register_forward_pre_hook(keep_targets)
    try:
        yield
    finally:
        handle.remove()


def lm_loss(model: Any, head_owner: Any, inputs: dict[str, Any], batch: dict,
            loss_fn: "TokenLoss") -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Forward one packed micro-batch with the LM head only at its target positions; ``loss_fn``'s
    ``(loss, stats, bad_rows)``.  The one forward of training, evaluation and the benchmarks.

    Args:
        model: what to call (a DeepSpeed engine, or the model itself).
        head_owner: the Hugging Face model whose LM head is restricted (``engine.module``, or ``model``).
        inputs: the model's keyword arguments (:func:`anygpt.attention.attention_inputs`).
        batch: the loader's batch (``labels``, ``tasks``).
    """
    with logits_only_at(head_owner, target_positions(batch["labels"])):
        logits = model(**inputs).logits
    return loss_fn(logits, batch["labels"], batch.get("tasks"))


class TokenLoss:
    """Callable ``(logits, labels, tasks) -> (mean loss, stats, bad_rows)``.

    ``logits`` are either ``[N, V]`` at :func:`target_positions` (from :func:`logits_only_at`) or the
    full ``[B, L, V]``.  ``stats`` is a float64 tensor ``[2, M + T]``: row 0 loss sums, row 1 token
    counts, columns the ``modalities`` then the ``tasks`` names; summing it over micro-batches and ranks
    (all_reduce) and dividing gives exact token-weighted means.  ``bad_rows``: batch rows with a
    non-finite loss (their sample keys get logged).
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
        positions = target_positions(labels).to(logits.device)
        if logits.dim() == 3:
            logits = logits[positions]
        # positions[:, -1] is always False, so selecting labels[:, 1:] by positions[:, :-1] walks the
        # targets in the same row-major order as the logits.
        shifted = positions[:, :-1]
        target = labels[:, 1:].to(logits.device)[shifted]
        if logits.shape[0] != target.shape[0]:
            raise ValueError(f"logits for {logits.shape[0]} positions but {target.shape[0]} targets")
        ce = F.cross_entropy(logits.float(), target, reduction="none")
        loss = ce.sum() / max(int(target.numel()), 1)
        with torch.no_grad():
            rows = positions.nonzero()[:, 0]
            bad_rows = sorted(set(rows[~torch.isfinite(ce)].tolist()))
            flat_ce = ce.double()
            stats = self.zeros()
            mod = self.table[target.clamp(0, self.table.numel() - 1)]
            m = len(self.modalities)
            stats[0, :m] = torch.bincount(mod, weights=flat_ce, minlength=m)[:m]
            stats[1, :m] = torch.bincount(mod, minlength=m)[:m].double()
            if tasks is not None:
                task = tasks[:, 1:].to(logits.device)[shifted].clamp(0, len(self.tasks) - 1)
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
