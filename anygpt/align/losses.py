"""The preference objectives, on per-token log-probabilities of response tokens (pure tensor code).

GRPO (DeepSeekMath, arXiv 2402.03300), for the ``G`` samples of one prompt with rewards ``r``::

    A_i   = (r_i - mean(r)) / (std(r) + eps)            (std: unbiased; without scaling only r_i - mean)
    rho_t = exp(logp_t - logp_old_t)
    obj_t = min(rho_t A_i, clip(rho_t, 1 - eps_c, 1 + eps_c) A_i)
    kl_t  = exp(ref_t - logp_t) - (ref_t - logp_t) - 1  (k3, >= 0; only when kl_beta > 0)
    loss  = - sum_t w_t (obj_t - kl_beta kl_t)

The weights ``w_t`` say how tokens are averaged (``align.grpo.normalisation``): ``token`` gives every
response token of the step the same weight ``1 / (tokens of the step)`` (DAPO: long answers are not
down-weighted per token), ``sequence`` gives ``1 / (len_i x responses)`` (the GRPO paper: each answer
counts once).  Weights are computed for the whole step before it is split into micro-batches, so the
gradient of the accumulated micro-batches is exactly the gradient of the step's loss.

DPO (arXiv 2305.18290), on the summed log-probabilities of each answer's response tokens::

    loss = - log sigmoid(beta ((pi_c - ref_c) - (pi_r - ref_r)))      (optionally label-smoothed)
           + sft_weight (- pi_c / n_c)                                 (RPO, arXiv 2404.19733)

DPO alone can raise the margin by lowering both answers' likelihoods; the optional NLL of the chosen
answer per token (``align.dpo.sft_weight``) keeps the chosen (gold) answer's likelihood going up.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["group_advantages", "token_weights", "grpo_loss", "dpo_loss", "sequence_logprobs"]


def group_advantages(rewards: torch.Tensor, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """``[groups, G]`` rewards -> advantages relative to each group (mean 0, and std 1 when ``scale``).

    A group whose rewards are all equal gets zero advantages (it teaches nothing).
    """
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [groups, G>=2], got {tuple(rewards.shape)}")
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if not scale:
        return centred
    return centred / (rewards.std(dim=1, keepdim=True) + eps)


def token_weights(lengths: Sequence[int], normalisation: str, total_tokens: int | None = None,
                  total_sequences: int | None = None) -> list[float]:
    """Per-sequence weight of each of its tokens (every token of sequence ``i`` gets ``out[i]``).

    Args:
        lengths: response tokens of each sequence.
        normalisation: ``token`` or ``sequence`` (see the module docstring).
        total_tokens / total_sequences: the step's totals when ``lengths`` is a part of it (several
            ranks); default: ``lengths`` is the whole step.
    """
    if normalisation == "token":
        total = total_tokens if total_tokens is not None else sum(lengths)
        return [1.0 / max(total, 1)] * len(lengths)
    if normalisation == "sequence":
        n = total_sequences if total_sequences is not None else len(lengths)
        return [1.0 / (max(l, 1) * max(n, 1)) for l in lengths]
    raise ValueError(f"normalisation must be 'token' or 'sequence', not {normalisation!r}")


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, weights: torch.Tensor,
              clip_eps: float = 0.2, kl_beta: float = 0.0,
              ref_logp: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped GRPO objective over response tokens (all tensors ``[N]``, one entry per token).

    Args:
        logp: log-probabilities of the sampled tokens under the policy being trained (with grad).
        old_logp: the same under the policy that sampled them (no grad).
        advantages: the advantage of each token's sequence.
        weights: each token's weight (:func:`token_weights`); zero for skipped groups.
        clip_eps: the ratio's clipping range.
        kl_beta: weight of the KL penalty (0: no penalty, ``ref_logp`` unused).
        ref_logp: log-probabilities under the reference policy (needed when ``kl_beta > 0``).

    Returns:
        ``(loss, stats)`` with weighted sums in ``stats``: ``kl``, ``clipped`` (fraction of weight
        whose ratio was clipped), ``ratio``.
    """
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * advantages
    objective = torch.minimum(unclipped, clipped)
    kl = torch.zeros_like(logp)
    if kl_beta > 0:
        if ref_logp is None:
            raise ValueError("grpo_loss: kl_beta > 0 needs ref_logp")
        delta = ref_logp - logp
        kl = torch.exp(delta) - delta - 1.0
    per_token = -(objective - kl_beta * kl)
    loss = (per_token * weights).sum()
    with torch.no_grad():
        was_clipped = ((ratio < 1.0 - clip_eps) | (ratio > 1.0 + clip_eps)).to(weights.dtype)
        stats = {"kl": (kl.detach() * weights).sum(), "clipped": (was_clipped * weights).sum(),
                 "ratio": (ratio.detach() * weights).sum()}
    return loss, stats


def dpo_loss(pi_chosen: torch.Tensor, pi_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1, label_smoothing: float = 0.0,
             sft_weight: float = 0.0,
             chosen_tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair DPO losses ``[P]`` from summed response log-probabilities ``[P]`` (policy and reference).

    ``sft_weight > 0`` adds that multiple of the chosen answer's NLL per token (``chosen_tokens``:
    its response token counts ``[P]``).  Returns ``(losses, stats)``: ``stats`` holds per-pair
    ``chosen_reward`` / ``rejected_reward`` (``beta (pi - ref)``, the implicit rewards), ``margin``,
    ``accuracy`` (margin > 0) and, with the NLL term, ``chosen_nll``.
    """
    chosen = pi_chosen - ref_chosen
    rejected = pi_rejected - ref_rejected
    logits = beta * (chosen - rejected)
    losses = -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    with torch.no_grad():
        stats = {"chosen_reward": beta * chosen.detach(), "rejected_reward": beta * rejected.detach(),
                 "margin": logits.detach(), "accuracy": (logits.detach() > 0).to(logits.dtype)}
    if sft_weight > 0:
        if chosen_tokens is None:
            raise ValueError("dpo_loss: sft_weight > 0 needs chosen_tokens")
        nll = -pi_chosen / chosen_tokens.clamp(min=1).to(pi_chosen.dtype)
        losses = losses + sft_weight * nll
        stats["chosen_nll"] = nll.detach()
    return losses, stats


def sequence_logprobs(token_logp: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Sum per-token log-probabilities ``[N]`` into per-sequence sums ``[n_rows]`` (``rows``: each
    token's sequence index)."""
    return torch.zeros(n_rows, dtype=token_logp.dtype, device=token_logp.device).index_add(0, rows, token_logp)
