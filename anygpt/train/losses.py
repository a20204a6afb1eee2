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

The head and its cross-entropy are one chunked step (:func:`head_cross_entropy`) when the head is a
plain ``Linear``: the ``[N, V]`` logits are never materialised, a cache-sized block of rows at a time
goes through matmul, softmax and the two gradient matmuls while it is still in cache, and the
gradients of a plain mean loss are made in the forward.  Why: with a small model the head *is* the
step, and on CPU the unfused path spends as much time allocating, page-faulting and re-reading the
55 MB of logits (760 targets x 18k ids) as multiplying; on a GPU the logits of a 50k vocabulary are the
largest activation of a step.  Same numbers up to float rounding (tested against the unfused path).
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


def target_ids(labels: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``[N]`` the ids predicted at ``positions`` (:func:`target_positions`), in their row-major order:
    ``positions[:, -1]`` is always False, so ``labels[:, 1:]`` selected by ``positions[:, :-1]`` lines up."""
    return labels[:, 1:].to(positions.device)[positions[:, :-1]]


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


# Rows of logits per chunk of :func:`head_cross_entropy`: about 8 MiB of fp32 logits on CPU (stays in
# cache across the softmax and the gradient matmuls), 512 MiB on an accelerator (big enough to keep it
# busy, small next to a 50k-vocabulary's full logits).
_CHUNK_BYTES = {"cpu": 8 << 20}
_CHUNK_BYTES_ACCELERATOR = 512 << 20


def _chunk_rows(vocab: int, device: torch.device) -> int:
    return max(16, _CHUNK_BYTES.get(device.type, _CHUNK_BYTES_ACCELERATOR) // (4 * vocab))


class _HeadCrossEntropy(torch.autograd.Function):
    """``ce[i] = logsumexp(h_i W^T) - (h_i W^T)[y_i]`` over chunks of rows; see :func:`head_cross_entropy`."""

    @staticmethod
    def forward(ctx, hidden, weight, target, grads_in_forward):
        n, rows = hidden.shape[0], _chunk_rows(weight.shape[0], hidden.device)
        ce = hidden.new_empty(n, dtype=torch.float32)
        lse = hidden.new_empty(n, dtype=torch.float32)
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        early = grads_in_forward and (want_h or want_w)
        grad_h = torch.empty_like(hidden) if early and want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if early and want_w else None
        for start in range(0, n, rows):
            h, y = hidden[start:start + rows], target[start:start + rows]
            z = (h @ weight.t()).float()
            picked = z.gather(1, y[:, None]).squeeze(1)
            top = z.amax(1, keepdim=True)
            z.sub_(top).exp_()  # in place: z becomes the softmax's numerator
            total = z.sum(1, keepdim=True)
            lse[start:start + rows] = (top + total.log()).squeeze(1)
            ce[start:start + rows] = lse[start:start + rows] - picked
            if early:
                z.div_(total)
                z[torch.arange(len(y), device=z.device), y] -= 1.0  # d ce / d logits = softmax - one-hot
                _accumulate(z, h, weight, grad_h, grad_w, start)
        ctx.save_for_backward(hidden, weight, target, lse)
        ctx.early = (grad_h, grad_w) if early else None
        return ce

    @staticmethod
    def backward(ctx, grad_ce):
        hidden, weight, target, lse = ctx.saved_tensors
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # The made-in-forward gradients hold for one weight on every row (a plain mean; all-NaN too, so a
        # non-finite loss still gives NaN gradients); anything else recomputes the chunks.
        if ctx.early is not None and (grad_ce.numel() == 0 or not bool((grad_ce - grad_ce[0]).abs().max() > 0)):
            grad_h, grad_w = ctx.early
            scale = grad_ce[0] if grad_ce.numel() else grad_ce.new_zeros(())
            return (grad_h * scale.to(grad_h.dtype) if want_h else None,
                    (grad_w * scale).to(weight.dtype) if want_w else None, None, None)
        rows = _chunk_rows(weight.shape[0], hidden.device)
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        for start in range(0, hidden.shape[0], rows):
            h, y = hidden[start:start + rows], target[start:start + rows]
            z = (h @ weight.t()).float()
            z.sub_(lse[start:start + rows, None]).exp_()
            z[torch.arange(len(y), device=z.device), y] -= 1.0
            z.mul_(grad_ce[start:start + rows, None])
            _accumulate(z, h, weight, grad_h, grad_w, start)
        return grad_h, (grad_w.to(weight.dtype) if want_w else None), None, None


def _accumulate(grad_logits, h, weight, grad_h, grad_w, start) -> None:
    """Adds one chunk's share of the head's gradients (``grad_logits`` ``[rows, V]`` fp32)."""
    g = grad_logits.to(weight.dtype)
    if grad_h is not None:
        grad_h[start:start + len(h)] = g @ weight
    if grad_w is not None:
        if g.dtype == grad_w.dtype:
            grad_w.addmm_(g.t(), h)  # in place: no [V, H] temporary per chunk
        else:
            grad_w.add_((g.t() @ h).float())  # bf16 products, summed over chunks in fp32


def head_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, *,
                       plain_mean: bool = True) -> torch.Tensor:
    """Per-row cross-entropy ``[N]`` (fp32) of the logits ``hidden @ weight.T`` against ``target``, without
    materialising the logits.

    Args:
        hidden: ``[N, H]`` hidden states at the target positions.
        weight: ``[V, H]`` LM head weight (no bias).
        target: ``[N]`` target ids.
        plain_mean: the loss will be ``ce.mean()``-like (one weight for every row), so the gradients are
            made in the forward pass, in the same chunk walk (3 matmuls in all, not 4); other weightings
            (alignment's per-token advantages) still get exact gradients, by recomputing the chunks.
    """
    return _HeadCrossEntropy.apply(hidden, weight, target, plain_mean)


def fusable_head(model: Any) -> Any:
    """The model's LM head if :func:`head_cross_entropy` can stand in for it (a bias-free ``Linear``
    whose ``forward`` is the class's own), else None: a LoRA-wrapped head, or one under an
    ``accelerate`` dispatch hook, which replaces ``forward`` to move tensors between devices."""
    head = model.get_output_embeddings()
    plain = type(head) is torch.nn.Linear and head.bias is None and "forward" not in vars(head)
    return head if plain else None


@contextlib.contextmanager
def head_loss_at(model: Any, positions: torch.Tensor, target: torch.Tensor, *,
                 plain_mean: bool = True) -> Iterator[None]:
    """Within the block, ``model``'s LM head (:func:`fusable_head`) returns the per-target
    cross-entropy ``[N]`` (:func:`head_cross_entropy`) instead of logits, so a forward's ``.logits`` is
    that vector.  The head's ``forward`` is swapped, not its module: DeepSpeed's ZeRO-3 hooks on the
    module still gather the weight before it runs and for the backward.
    """
    head = fusable_head(model)
    if head is None:
        raise ValueError(f"{type(model).__name__}'s LM head is not a bias-free Linear")

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        return head_cross_entropy(hidden[positions.to(hidden.device)], head.weight, target.to(hidden.device),
                                  plain_mean=plain_mean)

    head.forward = forward
    try:
        yield
    finally:
        del head.forward  # back to the class's forward


def target_cross_entropy(model: Any, head_owner: Any, inputs: dict[str, Any], labels: torch.Tensor, *,
                         plain_mean: bool = True) -> torch.Tensor:
    """One forward; the cross-entropy ``[N]`` (fp32) of every target of ``labels``, row-major.  Through
    the chunked head (:func:`head_loss_at`) when :func:`fusable_head` allows, else from the ``[N, V]``
    logits at the targets (:func:`logits_only_at`).

    Args:
        model: what to call (a DeepSpeed engine, or the model itself).
        head_owner: the Hugging Face model whose LM head is restricted (``engine.module``, or ``model``).
        inputs: the model's keyword arguments.
        labels: ``[B, L]`` with ``IGNORE`` where there is no target.
        plain_mean: see :func:`head_cross_entropy`.
    """
    positions = target_positions(labels)
    target = target_ids(labels, positions)
    if fusable_head(head_owner) is not None:
        with head_loss_at(head_owner, positions, target, plain_mean=plain_mean):
            return model(**inputs).logits
    with logits_only_at(head_owner, positions):
        logits = model(**inputs).logits
    return F.cross_entropy(logits.float(), target.to(logits.device), reduction="none")


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
    ce = target_cross_entropy(model, head_owner, inputs, batch["labels"])
    return loss_fn.reduce(ce, batch["labels"], batch.get("tasks"))


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
        target = target_ids(labels, positions)
        if logits.shape[0] != target.shape[0]:
            raise ValueError(f"logits for {logits.shape[0]} positions but {target.shape[0]} targets")
        return self.reduce(F.cross_entropy(logits.float(), target, reduction="none"), labels, tasks)

    def reduce(self, ce: torch.Tensor, labels: torch.Tensor,
               tasks: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """``(mean loss, stats, bad_rows)`` from the per-target cross-entropy ``ce`` ``[N]`` (row-major
        order of :func:`target_positions`, as :func:`head_cross_entropy` gives it)."""
        positions = target_positions(labels).to(ce.device)
        shifted = positions[:, :-1]
        target = target_ids(labels, positions)
        if ce.shape[0] != target.shape[0]:
            raise ValueError(f"losses for {ce.shape[0]} positions but {target.shape[0]} targets")
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
                task = tasks[:, 1:].to(ce.device)[shifted].clamp(0, len(self.tasks) - 1)
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
