"""Loading a model directory for inference: LM + tokenizer + vocabulary layout, on the right device.

A model directory is either our export (Hugging Face model + tokenizer + ``vocab_layout.json`` +
codec cards, maybe ``codecs/`` and ``soundstorm/``) or a released AnyGPT checkpoint (HF model +
tokenizer with AnyGPT's added tokens, no ``vocab_layout.json``): the layout is then read from the
tokenizer, so role tokens (``[MMGPT]``/``<eos>`` in the release) come from the checkpoint itself.
A layout may hold any subset of the registered modalities (a speech-only model has just speech);
what it lacks is reported by ``layout.missing()``, never guessed.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from anygpt.infer.generation import Generator, pick_device, pick_dtype
from anygpt.layout import VocabLayout
from anygpt.model import quiet_transformers
from anygpt.text_tokenizer import load_tokenizer, read_layout


class ModelLoadError(ValueError):
    """The model directory cannot be used for inference (the message names the directory)."""


@dataclass
class LoadedLM:
    """An LM ready to generate: model on its device, tokenizer, layout and a :class:`Generator`."""

    model: Any
    tokenizer: Any
    layout: VocabLayout
    directory: Path
    generator: Generator
    released_format: bool  # True when the layout came from an AnyGPT release tokenizer

    @property
    def device(self) -> torch.device:
        return self.generator.device

    @property
    def context_length(self) -> int:
        return self.generator.context_length


def load_lm(model_dir: str | Path, tokenizer_dir: str | Path | None = None, device: str | None = "auto",
            dtype: str | torch.dtype | None = "auto", context_length: int | None = None) -> LoadedLM:
    """Load a model directory for generation.

    Args:
        model_dir: Hugging Face model directory (our export or a released AnyGPT checkpoint).
        tokenizer_dir: tokenizer directory when it is not inside ``model_dir``.
        device: ``auto`` (CUDA when present), ``cpu``, ``cuda:1`` ...
        dtype: ``auto`` (bf16 on CUDA, fp32 on CPU), ``fp32``, ``bf16``, ``fp16``.
        context_length: cap on prompt + answer (default: the model's ``max_position_embeddings``).
    """
    from transformers import AutoModelForCausalLM

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ModelLoadError(f"{model_dir}: not a model directory (no config.json)")
    tok_dir = Path(tokenizer_dir) if tokenizer_dir is not None else model_dir
    tokenizer = load_tokenizer(tok_dir)
    layout, saved = read_layout(tokenizer, tok_dir, model_dir)
    released = not saved
    dev = pick_device(device)
    dt = pick_dtype(dev, dtype)
    # On CUDA the weights go straight to the GPU (no full CPU copy of a 7B model first).
    placement = {"device_map": str(dev)} if dev.type == "cuda" else {}
    try:
        with quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dt, local_files_only=True, **placement)
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelLoadError(f"{model_dir}: cannot load model: {str(e).splitlines()[0]}") from None
    rows = model.get_output_embeddings().weight.shape[0]
    if rows < layout.total:
        raise ModelLoadError(f"{model_dir}: the model has {rows} output rows but its vocabulary layout needs "
                             f"{layout.total}; was it exported after resizing to the layout?")
    model.to(dev).eval()
    ctx = int(getattr(model.config, "max_position_embeddings", 2048))
    if context_length is not None:
        ctx = min(ctx, int(context_length))
    return LoadedLM(model, tokenizer, layout, model_dir, Generator(model, tokenizer, layout, ctx), released)
