"""The language model: a ``transformers`` LlamaForCausalLM sized to the vocabulary layout.

``tiny`` is a randomly initialised LLaMA with the real code path (tests, demo); anything else is a
local Hugging Face directory (LLaMA-2 base, a stage-1 export, a released AnyGPT checkpoint).
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

from anygpt.layout import VocabLayout

# Named configs.  ``tiny`` keeps every LLaMA feature (RoPE, GQA-capable attention, SwiGLU,
# RMSNorm) at a size that trains in seconds on 2 CPU cores.
NAMED_CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-5,
                 tie_word_embeddings=False, initializer_range=0.02),
    "small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=8, max_position_embeddings=2048, rms_norm_eps=1e-5,
                  tie_word_embeddings=False, initializer_range=0.02),
    # ~0.9 B parameters with the AnyGPT layout (0.82 B without the embeddings): TinyLlama's width and
    # MLP, 16 layers, head_dim 128 as in LLaMA (every flash kernel takes it); built from scratch by
    # `anygpt bench gpu` to measure a GPU without downloading a checkpoint.
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
               num_key_value_heads=16, max_position_embeddings=4096, rms_norm_eps=1e-5,
               tie_word_embeddings=False, initializer_range=0.02),
}


class ModelError(ValueError):
    pass


def llama_config(name: str, vocab_size: int, tokenizer: Any | None = None):
    from transformers import LlamaConfig

    if name not in NAMED_CONFIGS:
        raise ModelError(f"unknown model config {name!r}; named configs: {sorted(NAMED_CONFIGS)} (or a directory)")
    extra = {}
    if tokenizer is not None:
        extra = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id)
    return LlamaConfig(vocab_size=vocab_size, **NAMED_CONFIGS[name], **extra)


def build_model(name_or_dir: str, layout: VocabLayout, tokenizer: Any | None = None,
                dtype: torch.dtype = torch.float32, seed: int | None = None) -> torch.nn.Module:
    """Build (``tiny``/``small``) or load (directory) a causal LM and resize it to ``layout.total``.

    Call inside ``deepspeed.zero.Init`` to build a large model directly partitioned under ZeRO-3;
    :func:`resize_to_layout` gathers what it needs.
    """
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    if name_or_dir in NAMED_CONFIGS:
        if seed is not None:
            torch.manual_seed(seed)
        model = LlamaForCausalLM(llama_config(name_or_dir, layout.base_vocab_size, tokenizer)).to(dtype)
    else:
        path = Path(name_or_dir)
        if not (path / "config.json").is_file():
            raise ModelError(f"{path}: not a model directory (no config.json); use 'tiny' or a local HF model dir")
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True)
    resize_to_layout(model, layout)
    return model


def _gathered(params: list[torch.nn.Parameter]):
    """Gather ZeRO-3 partitioned parameters for modification (no-op for ordinary parameters)."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=0)
    return contextlib.nullcontext()


@torch.no_grad()
def resize_to_layout(model: torch.nn.Module, layout: VocabLayout) -> int:
    """Grow embeddings and LM head to ``layout.total`` rows; returns the number of rows added.

    New rows start at the mean of the existing rows.  A random init puts new tokens' logits on a
    different scale from the trained ones, so the first steps after vocabulary expansion are spent
    undoing that (and in fp16/bf16 can blow up); the mean row gives new tokens an "average word"
    start: logits of the same scale, and the pretrained rows are left bit-identical.
    """
    emb = model.get_input_embeddings()
    with _gathered([emb.weight]):
        old = emb.weight.shape[0]
    if old > layout.total:
        raise ModelError(f"model has {old} embedding rows, more than the layout's {layout.total}")
    if old == layout.total:
        return 0
    model.resize_token_embeddings(layout.total, mean_resizing=False)
    pairs = [model.get_input_embeddings().weight]
    head = model.get_output_embeddings()
    if head is not None and head.weight is not pairs[0]:
        pairs.append(head.weight)
    with _gathered(pairs):
        if all(p.numel() > 0 for p in pairs):  # on ZeRO ranks other than the modifier the view is empty
            for w in pairs:
                w[old:] = w[:old].mean(dim=0, keepdim=True).to(w.dtype)
    model.config.vocab_size = layout.total
    return layout.total - old


@contextlib.contextmanager
def quiet_transformers():
    """No weight-loading progress bars or info logs while loading (one clean line per event)."""
    try:
        from transformers.utils import logging as hf_logging
    except Exception:  # pragma: no cover
        yield
        return
    was = hf_logging.is_progress_bar_enabled()
    level = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if was:
            hf_logging.enable_progress_bar()
