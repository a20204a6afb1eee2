"""Tiny random model directories for tests, demos and trying the CLI without a checkpoint.

``build_tiny_model_dir(dir)`` writes what an export holds (HF model + tokenizer with the layout's
added tokens + ``vocab_layout.json``) at the ``tiny`` size, for every registered modality or a
subset (``modalities=["speech"]``: a SpeechGPT-style model); ``release_style=True`` writes what a
released AnyGPT checkpoint holds instead (AnyGPT's added-token order and ``[MMGPT]``/``<eos>`` roles,
no ``vocab_layout.json``), to prove that such checkpoints load and chat through the same code.
``excite_specials`` makes a random model open and close spans often, which the constraint tests need
(a random model otherwise almost never leaves plain text).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from anygpt import modalities as registry
from anygpt.layout import VocabLayout
from anygpt.model import build_model
from anygpt.text_tokenizer import load_tokenizer, prepare_tokenizer, train_tiny_tokenizer

TINY_TEXTS = [
    "a red bus drives down the street", "the cat sits on a warm mat", "hello world, how are you today",
    "calm piano music with soft drums", "a man reads a short story aloud", "draw a blue circle on white paper",
    "transcribe the speech in the clip", "describe the picture in one sentence", "the river is quiet at night",
    "she sings a happy song in the morning", "green trees and a yellow sun", "compose a slow guitar piece",
]


def _tiny_tokenizer(directory: Path, vocab_size: int = 320) -> Path:
    return train_tiny_tokenizer(TINY_TEXTS * 8, directory, vocab_size=vocab_size)


def release_style_tokenizer(src_dir: Path, out_dir: Path) -> tuple[Any, VocabLayout]:
    """Add tokens the way AnyGPT's release did (roles ``[Human] [MMGPT] <eoh> <eos>``, then per
    modality ``<prefixN>``... followed by its start/end markers) and save, without ``vocab_layout.json``.

    The release held the founding modalities only, in registry order (the release's own order).
    """
    tok = load_tokenizer(src_dir)
    tok.add_tokens(["[Human]", "[MMGPT]", "<eoh>", "<eos>"], special_tokens=True)
    founding = [name for name, p in registry.registered().items() if p.founding]
    for m in VocabLayout.default(len(tok), founding).modalities.values():
        tok.add_tokens([f"<{m.prefix}{c}>" for c in range(m.size)])
        tok.add_tokens([m.start, m.end], special_tokens=True)
    tok.save_pretrained(str(out_dir))
    return tok, VocabLayout.from_tokenizer(tok)


def build_tiny_model_dir(directory: str | Path, seed: int = 0, release_style: bool = False,
                         modalities: Sequence[str] | None = None) -> Path:
    """A tiny random LM directory loadable by ``anygpt chat --model DIR`` (about 5 s on a CPU).

    Args:
        directory: where ``model/`` (and the raw tokenizer it was made from) go.
        seed: weight initialisation seed.
        release_style: lay the tokenizer out like AnyGPT's release (no ``vocab_layout.json``).
        modalities: the layout's modalities (default: every registered one).
    """
    directory = Path(directory)
    raw = _tiny_tokenizer(directory / "_tokenizer_src")
    model_dir = directory / "model"
    if release_style:
        if modalities is not None:
            raise ValueError("a release-style tokenizer holds the release's modalities; leave modalities unset")
        tok, layout = release_style_tokenizer(raw, model_dir)
    else:  # saves tokenizer + vocab_layout.json
        tok, layout = prepare_tokenizer(raw, model_dir, modalities=modalities)
    model = build_model("tiny", layout, tok, seed=seed)
    model.save_pretrained(str(model_dir))
    return model_dir


@torch.no_grad()
def excite_specials(model: Any, layout: VocabLayout, seed: int, scale: float = 3.0) -> None:
    """Give the output rows of the layout's special tokens large random weights (seeded), so that a
    random model opens/closes spans and ends turns often (different seeds, different habits)."""
    g = torch.Generator().manual_seed(seed)
    head = model.get_output_embeddings().weight
    for tid in layout.specials.values():
        head[tid] = (torch.randn(head.shape[1], generator=g) * scale).to(head)
