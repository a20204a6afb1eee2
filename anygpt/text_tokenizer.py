"""Text tokenizer: any local Hugging Face tokenizer directory, or a tiny SentencePiece one made on the spot.

Production uses LLaMA-2's SentencePiece tokenizer (32000 pieces).  Tests and the demo cannot
download it, so :func:`train_tiny_tokenizer` trains a small SentencePiece model on local text and
saves it as an HF tokenizer directory, which then goes through exactly the same loading code.

Saved tokenizers carry the layout's added tokens (roles, markers, ``<👀N>``...) so an exported model
is usable by plain ``transformers``; our own code maps modality codes arithmetically instead.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from anygpt.layout import LAYOUT_FILE, LayoutError, VocabLayout


class TokenizerError(ValueError):
    pass


def load_tokenizer(directory: str | Path) -> Any:
    """Load a local HF tokenizer directory (no hub access)."""
    from transformers import AutoTokenizer

    directory = Path(directory)
    if not directory.is_dir():
        raise TokenizerError(f"{directory}: tokenizer directory not found")
    try:
        tok = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except Exception as e:  # transformers raises many types; the user needs the path and the reason
        raise TokenizerError(f"{directory}: cannot load tokenizer: {str(e).splitlines()[0]}") from None
    if tok.pad_token_id is None:
        # LLaMA has no pad token; padding is always masked out of the loss, so unk is a safe choice.
        tok.pad_token = tok.unk_token or tok.eos_token
    return tok


def read_layout(tokenizer: Any, *dirs: str | Path, modalities: Sequence[str] | None = None,
                cards: Mapping[str, Mapping[str, Any]] | None = None) -> tuple[VocabLayout, bool]:
    """The layout a tokenizer belongs to: the ``vocab_layout.json`` saved in the first of ``dirs``
    that has one (a checkpoint, an export, a prepared tokenizer), else read from the tokenizer's
    added tokens (a released AnyGPT checkpoint), else our default for ``modalities``/``cards`` (a
    base text tokenizer).

    Returns ``(layout, saved)``.  A saved layout is checked against the tokenizer's added tokens
    (where the tokenizer has them), because a mismatch would silently turn every special token into
    a different one; ``cards`` (a run's codecs) are checked against it (:meth:`VocabLayout.check_cards`).
    """
    for d in dirs:
        if (Path(d) / LAYOUT_FILE).is_file():
            layout = VocabLayout.load(d)
            vocab = tokenizer.get_vocab()
            for tok, tid in layout.specials.items():
                if tok in vocab and vocab[tok] != tid:
                    raise LayoutError(f"{Path(d) / LAYOUT_FILE}: {tok} has id {tid} but the tokenizer says {vocab[tok]}")
            if modalities is not None and set(modalities) != set(layout.modalities):
                raise LayoutError(f"{Path(d) / LAYOUT_FILE} holds modalities {sorted(layout.modalities)}, "
                                  f"not the {sorted(modalities)} asked for")
            if cards:
                layout.check_cards(cards, str(Path(d) / LAYOUT_FILE))
            return layout, True
    layout = VocabLayout.from_tokenizer(tokenizer, modalities, cards)
    if cards:
        layout.check_cards(cards, "the tokenizer's layout")
    return layout, False


def add_layout_tokens(tokenizer: Any, layout: VocabLayout) -> None:
    """Add the layout's tokens to ``tokenizer`` and check they landed on the layout's ids.

    Only done for our own layout (released AnyGPT tokenizers already hold theirs).
    """
    vocab = tokenizer.get_vocab()
    missing = [t for t in layout.added_token_strings() if t not in vocab]
    if missing:
        if len(tokenizer) != layout.base_vocab_size:
            raise TokenizerError(
                f"tokenizer has {len(tokenizer)} tokens but the layout starts adding at {layout.base_vocab_size}"
            )
        specials = set(layout.specials)
        # add_tokens assigns ids sequentially, so tokens go in id order, in runs of one kind.
        # Specials are "special" so decode(skip_special_tokens=True) drops them; modality tokens
        # stay normal added tokens, as in AnyGPT's release.
        runs: list[tuple[bool, list[str]]] = []
        for tok in missing:
            kind = tok in specials
            if runs and runs[-1][0] == kind:
                runs[-1][1].append(tok)
            else:
                runs.append((kind, [tok]))
        for kind, toks in runs:
            tokenizer.add_tokens(toks, special_tokens=kind)
    vocab = tokenizer.get_vocab()
    for tok, tid in list(layout.specials.items()) + [
        (f"<{m.prefix}{c}>", m.offset + c) for m in layout.modalities.values() for c in (0, m.size - 1)
    ]:
        if vocab.get(tok) != tid:
            raise TokenizerError(f"added token {tok} got id {vocab.get(tok)}, layout says {tid}")


def train_tiny_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 512) -> Path:
    """Train a small SentencePiece BPE model on ``texts`` and save it as an HF tokenizer directory.

    LLaMA-style settings (byte fallback, BOS/EOS, unk at 0) keep the tiny tokenizer on the same code
    path as LLaMA-2's.  ``remove_extra_whitespaces=False`` makes raw SentencePiece and HF encodings
    agree (PLATFORM.md).
    """
    import io

    import sentencepiece as spm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    text = [t for t in texts if t.strip()]
    if not text:
        raise TokenizerError("no text to train a tokenizer on")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        remove_extra_whitespaces=False,
        hard_vocab_limit=False,
        minloglevel=2,
        num_threads=1,
    )
    (out_dir / "tokenizer.model").write_bytes(model.getvalue())
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": False,
        "model_max_length": 4096,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    # Convert once through transformers so the directory also holds tokenizer.json (fast to load).
    tok = load_tokenizer(out_dir)
    tok.save_pretrained(str(out_dir))
    return out_dir


def prepare_tokenizer(source_dir: str | Path, out_dir: str | Path | None = None, *,
                      layout_dirs: Sequence[str | Path] = (), modalities: Sequence[str] | None = None,
                      cards: Mapping[str, Mapping[str, Any]] | None = None) -> tuple[Any, VocabLayout]:
    """Load a tokenizer, give it its layout (:func:`read_layout` over ``source_dir`` and
    ``layout_dirs``) and the layout's added tokens, optionally save both to ``out_dir``.

    This is the one place a training run gets its tokenizer and layout.
    """
    tok = load_tokenizer(source_dir)
    layout, _ = read_layout(tok, source_dir, *layout_dirs, modalities=modalities, cards=cards)
    add_layout_tokens(tok, layout)
    if out_dir is not None:
        tok.save_pretrained(str(out_dir))
        layout.save(out_dir)
    return tok, layout
