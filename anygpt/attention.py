"""Attention for packed rows: how the model is told that examples in one row never see each other.

A packed row holds several whole examples (and trailing padding); attention must be causal inside
each example and never cross into another.  Three paths give the model that pattern, chosen by
``model.attention`` (training) or ``anygpt eval --attention`` (held-out loss):

``mask4d``
    A boolean ``[B, 1, L, L]`` mask (the loader's default batch) through SDPA.  Runs and trains
    everywhere, but costs ``L * L`` bytes per row (16 MiB at 4096, 64 MiB at 8192) and, on a GPU, a
    dense mask keeps SDPA off its flash kernel (only the slower masked kernels accept one).
``flex``
    FlexAttention (in ``torch`` >= 2.5, no extra package) with a ``BlockMask`` built from the
    segment ids: a few KiB per row, and tiles that the pattern masks out entirely are skipped.
    transformers' ``flex_attention`` implementation takes the ``BlockMask`` as the attention mask.
    torch 2.13 has no FlexAttention backward on CPU (measured, PLATFORM.md): forward only there.
``flash_varlen``
    flash-attn's variable-length kernel (``flash_attn`` package, CUDA only) over the flattened batch,
    told where every example starts by cumulative lengths (``cu_seq_lens_q/k`` + ``max_length_q/k``,
    transformers' ``FlashAttentionKwargs`` for ``flash_attention_2``): no mask tensor at all.
    The lengths are computed on the host from the segment ids, so no step waits on the GPU for them.

``auto`` takes the first of ``flash_varlen``, ``flex``, ``mask4d`` that can *train* on the device:
``mask4d`` on a CPU.  The order follows what these kernels are documented to do on GPUs (padding-free
varlen packing is reported 1.4-2x faster than a dense mask, arXiv 2407.09105); ``anygpt bench gpu``
measures every path so a cluster can pin the fastest one.

Padding (segment 0) is one more segment in every path, attending causally to padding only, exactly
as in the 4-D mask: every path computes the same numbers at every position, and no softmax row is
empty (which would give NaN).  Position ids restart per example in every path (RoPE).
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import warnings
from typing import Any, Iterator

import torch

from anygpt.config import ATTENTION_CHOICES, ConfigError
from anygpt.data.packing import block_causal_mask

PATHS = tuple(c for c in ATTENTION_CHOICES if c != "auto")  # ("mask4d", "flex", "flash_varlen")
AUTO_ORDER = ("flash_varlen", "flex", "mask4d")  # fastest first (documented, see the module docstring)
HF_IMPLEMENTATION = {"mask4d": "sdpa", "flex": "flex_attention", "flash_varlen": "flash_attention_2"}
LOADER_ATTENTION = {"mask4d": "4d", "flex": "segments", "flash_varlen": "segments"}
"""The loader's ``attention`` argument per path: only ``mask4d`` needs the host-built ``L x L`` mask."""


def _has_flex() -> bool:
    return importlib.util.find_spec("torch.nn.attention.flex_attention") is not None


@functools.lru_cache(maxsize=None)
def _flex_backward_on(device_type: str) -> bool:
    """Whether FlexAttention can take gradients on this device type (probed once on CPU, where torch 2.13
    raises ``NotImplementedError``; a later torch that adds it passes the probe).  CUDA has Triton
    kernels for both directions; probing there would initialise CUDA in the launching process."""
    if device_type == "cuda":
        return True
    from torch.nn.attention.flex_attention import flex_attention

    q = torch.zeros(1, 1, 16, 16, requires_grad=True, device=device_type)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "called without torch.compile": the probe is 16 tokens
            flex_attention(q, q, q).sum().backward()
    except NotImplementedError:
        return False
    return True


def unavailable(path: str, device_type: str, training: bool = True) -> str | None:
    """Why ``path`` cannot run (``training``: forward and backward) on ``device_type``; ``None`` if it can."""
    if path == "mask4d":
        return None
    if path == "flex":
        if not _has_flex():
            return f"needs FlexAttention (torch >= 2.5; this is torch {torch.__version__})"
        if training and not _flex_backward_on(device_type):
            return (f"cannot train on {device_type}: torch {torch.__version__} has no FlexAttention backward "
                    f"there (forward only, e.g. `anygpt eval --attention flex`)")
        return None
    if path == "flash_varlen":
        if device_type != "cuda":
            return f"needs a CUDA GPU (flash-attn has CUDA kernels only; this is {device_type})"
        if importlib.util.find_spec("flash_attn") is None:
            return "needs the flash_attn package (pip install flash-attn --no-build-isolation), not installed"
        from transformers.utils import is_flash_attn_2_available

        if not is_flash_attn_2_available():
            return "flash_attn is installed but transformers cannot use it (flash-attn >= 2.3.3 on CUDA needed)"
        return None
    raise ValueError(f"unknown attention path {path!r}; choose from {PATHS}")


def resolve_attention(requested: str, device_type: str, training: bool = True,
                      key: str = "model.attention") -> str:
    """``auto`` -> the first of :data:`AUTO_ORDER` that trains on ``device_type``; a named path is checked.

    Raises :class:`~anygpt.config.ConfigError` (one line naming ``key``) for a path that cannot run here,
    so ``anygpt train`` fails before any rank starts.
    """
    if requested == "auto":
        return next(p for p in AUTO_ORDER if unavailable(p, device_type, training=True) is None)
    if requested not in PATHS:
        raise ConfigError(f"{key}: {requested!r} is not one of {list(ATTENTION_CHOICES)}")
    reason = unavailable(requested, device_type, training)
    if reason is not None:
        raise ConfigError(f"{key}: {requested} {reason}; use mask4d or auto")
    return requested


def _base_model(model: Any) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT wraps the HF model


def set_attention(model: Any, path: str) -> None:
    """Switch a transformers model (or a PEFT wrapper of one) to the implementation ``path`` needs."""
    _base_model(model).set_attn_implementation(HF_IMPLEMENTATION[path])


@contextlib.contextmanager
def using_attention(model: Any, path: str) -> Iterator[None]:
    """``path`` inside the block, the model's previous implementation after it (eval, then generation)."""
    base = _base_model(model)
    before = base.config._attn_implementation
    set_attention(base, path)
    try:
        yield
    finally:
        base.set_attn_implementation(before)


def varlen_lengths(segment_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``[B, L]`` segment ids -> (cumulative lengths ``int32 [n + 1]`` over the flattened ``B * L`` tokens,
    longest run).  A run is a maximal stretch of one segment id inside one row: each example, and the
    row's trailing padding, is one sequence for the varlen kernel."""
    seg = segment_ids.cpu()
    b, length = seg.shape
    starts = torch.ones(b, length, dtype=torch.bool)
    starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
    cu = torch.cat([starts.view(-1).nonzero().view(-1), torch.tensor([b * length])]).to(torch.int32)
    return cu, int(cu.diff().max())


def flex_block_mask(segment_ids: torch.Tensor) -> Any:
    """``[B, L]`` segment ids (on the model's device) -> FlexAttention ``BlockMask``: same segment and
    ``k <= q``, the pattern of :func:`~anygpt.data.packing.block_causal_mask` without its ``L x L`` tensor."""
    from torch.nn.attention.flex_attention import create_block_mask

    b, length = segment_ids.shape

    def same_example_causal(batch, head, q, k):
        return (segment_ids[batch, q] == segment_ids[batch, k]) & (k <= q)

    # Compiled on CUDA: the mask is then built tile by tile; uncompiled (CPU) it passes through one
    # dense [B, 1, L, L] boolean while being built, which CPU runs (tests, eval) can afford.
    return create_block_mask(same_example_causal, b, None, length, length, device=segment_ids.device,
                             _compile=segment_ids.device.type == "cuda")


def attention_inputs(batch: dict, path: str, device: torch.device | str) -> dict[str, Any]:
    """The model's keyword arguments for one packed batch (see :mod:`anygpt.data` for the batch format)."""
    inputs: dict[str, Any] = {"input_ids": batch["input_ids"].to(device, non_blocking=True),
                              "position_ids": batch["position_ids"].to(device, non_blocking=True)}
    if path == "mask4d":
        mask = batch.get("attention_mask")
        inputs["attention_mask"] = (mask.to(device, non_blocking=True) if mask is not None
                                    else block_causal_mask(batch["segment_ids"].to(device)))
    elif path == "flex":
        inputs["attention_mask"] = flex_block_mask(batch["segment_ids"].to(device, non_blocking=True))
    elif path == "flash_varlen":
        cu, longest = varlen_lengths(batch["segment_ids"])
        cu = cu.to(device, non_blocking=True)
        inputs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
    else:
        raise ValueError(f"unknown attention path {path!r}; choose from {PATHS}")
    return inputs


def mask_nbytes(inputs: dict[str, Any]) -> int:
    """Bytes a step holds to describe the attention pattern, from :func:`attention_inputs`' output."""
    mask = inputs.get("attention_mask")
    if isinstance(mask, torch.Tensor):
        return mask.nbytes
    if mask is not None:  # BlockMask: its block tables, plus the [B, L] int64 segment ids its mask_mod reads
        tables = sum(t.nbytes for t in mask.as_tuple() if isinstance(t, torch.Tensor))
        return tables + inputs["input_ids"].numel() * 8
    cu = inputs.get("cu_seq_lens_q")
    return cu.nbytes if cu is not None else 0  # cu_seq_lens_k is the same tensor
