"""The held-out loss: one implementation for the trainer's evaluation and ``anygpt eval``.

Both call :func:`heldout_loss` on an eval loader (:func:`anygpt.data.build_eval_loader`: pairs in both
directions, response-only loss), so the two report the same numbers under the same keys:

- ``loss``: mean next-token loss over every target token;
- ``loss_by_modality``: by the kind of *target* token, ``text`` or a modality of the layout (the
  breakdown the training log shows);
- ``loss_by_task``: by direction (``image2text``, ``text2speech``, ..., ``sft``);
- ``tokens``: target tokens scored.

The forward is the trainer's (:func:`anygpt.train.losses.lm_loss`: LM head only at the targets,
:class:`~anygpt.train.losses.TokenLoss`'s sums); on several ranks the sums are all-reduced before
dividing, so the means are exact token-weighted means over the whole held-out set.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

from anygpt.attention import LOADER_ATTENTION, attention_inputs, resolve_attention, using_attention
from anygpt.config import DataConfig, SourceConfig, TrainConfig
from anygpt.data import build_eval_loader
from anygpt.data.examples import task_names
from anygpt.train.losses import TokenLoss, lm_loss


@torch.no_grad()
def heldout_loss(model: Any, loader: Iterable[dict], layout: Any, device: torch.device | str, *,
                 head_owner: Any = None, inputs: Callable[[dict], dict[str, Any]] | None = None,
                 max_batches: int | None = None,
                 all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, Any]:
    """Loss on held-out batches, overall and per target modality and per task.

    Args:
        model: what to call: a Hugging Face causal LM, or a DeepSpeed engine (then every rank calls
            this with its own loader; the eval loader gives every rank the same number of batches).
        loader: batches of the eval loader.
        layout: the run's vocabulary layout (which ids are which modality).
        device: where the batches go.
        head_owner: the model whose LM head is restricted (``engine.module``; default ``model``).
        inputs: batch -> the model's keyword arguments (default: the 4-D mask, :func:`~anygpt.attention.attention_inputs` with ``mask4d``).
        max_batches: stop after this many batches (None or 0: the whole set).
        all_reduce: sums a tensor over ranks in place (None: one process).

    Returns:
        ``{"loss", "loss_by_modality", "loss_by_task", "tokens"}``.
    """
    loss_fn = TokenLoss(layout, task_names(), torch.device(device))
    to_inputs = inputs or (lambda batch: attention_inputs(batch, "mask4d", device))
    stats = loss_fn.zeros()
    was_training = model.training
    model.eval()
    try:
        for i, batch in enumerate(loader):
            if max_batches and i >= max_batches:
                break
            stats += lm_loss(model, head_owner if head_owner is not None else model, to_inputs(batch), batch,
                             loss_fn)[1]
    finally:
        model.train(was_training)
    if all_reduce is not None:
        stats = all_reduce(stats)
    by_mod, by_task = loss_fn.summarize(stats)
    m = len(loss_fn.modalities)
    count = float(stats[1, :m].sum())
    return {"loss": float(stats[0, :m].sum()) / max(count, 1.0), "loss_by_modality": by_mod,
            "loss_by_task": by_task, "tokens": int(count)}


def shards_heldout_loss(lm: Any, shards: str, seq_len: int = 512, *, attention: str = "auto",
                        batch_size: int = 8) -> dict[str, Any]:
    """:func:`heldout_loss` of a loaded model (:func:`anygpt.infer.loading.load_lm`) over held-out shards,
    through the packed-row ``attention`` path (``auto``: what training would use on this device), so a
    user can check a path's numbers on their own data.  The model's own attention implementation is
    restored afterwards (generation keeps working as before).

    Returns :func:`heldout_loss`'s dict plus ``attention`` (the path used) and ``read`` (the loader's
    counts: examples, skips, damaged shards, lost samples).
    """
    path = resolve_attention(attention, lm.device.type, training=False, key="--attention")
    cfg = TrainConfig(data=DataConfig(sources=[SourceConfig(name="eval", shards=shards)], eval_shards=shards,
                                      seq_len=seq_len))
    loader = build_eval_loader(cfg, lm.tokenizer, lm.layout, batch_size=batch_size,
                               attention=LOADER_ATTENTION[path])
    with using_attention(lm.model, path):
        loss = heldout_loss(lm.model, loader, lm.layout, lm.device,
                            inputs=lambda batch: attention_inputs(batch, path, lm.device))
    return {**loss, "attention": path, "read": loader.last_stats}


__all__ = ["heldout_loss", "shards_heldout_loss"]
