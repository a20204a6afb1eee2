"""Tiny random speech recognition model directories, saved the way real ones are (for tests and benches).

``tiny_whisper_dir(dir)`` writes a multilingual Whisper (``WhisperForConditionalGeneration`` with
a byte-level BPE tokenizer whose special tokens are the released ones: ``<|startoftranscript|>``, every
language, both tasks, ``<|notimestamps|>``...), a ``WhisperFeatureExtractor`` at 16 kHz and a generation config with ``lang_to_id`` /
``task_to_id``), ``tiny_ctc_dir(dir)`` a wav2vec 2.0 CTC model with a character vocabulary: the files
``openai/whisper-*`` and ``facebook/wav2vec2-base-960h`` hold, at a size that loads in a second.
Their transcripts are gibberish; the code paths are the real ones.
"""
from __future__ import annotations

import json
from pathlib import Path

def _whisper_specials() -> list[str]:
    """Whisper's special tokens in the released order: the tokenizer finds a language's token at
    ``<|startoftranscript|>`` + 1 + its index in ``LANGUAGES``, so every language must be there."""
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    return (["<|endoftext|>", "<|startoftranscript|>"] + [f"<|{code}|>" for code in LANGUAGES]
            + ["<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nocaptions|>",
               "<|notimestamps|>"])


def _byte_chars() -> list[str]:
    """GPT-2's byte -> printable character table (what a byte-level BPE vocabulary starts from)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def tiny_whisper_dir(path: str | Path, seed: int = 0) -> Path:
    """A random 2-layer Whisper saved with tokenizer, feature extractor and generation config."""
    import torch
    from transformers import (GenerationConfig, WhisperConfig, WhisperFeatureExtractor,
                              WhisperForConditionalGeneration, WhisperTokenizer)
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab = {c: i for i, c in enumerate(_byte_chars())}
    (path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (path / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    tok = WhisperTokenizer(str(path / "vocab.json"), str(path / "merges.txt"), unk_token="<|endoftext|>",
                           bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    specials = _whisper_specials()
    tok.add_special_tokens({"additional_special_tokens": specials[1:]})
    tok.save_pretrained(str(path))
    WhisperFeatureExtractor(feature_size=80, sampling_rate=16000).save_pretrained(str(path))
    ids = {s: tok.convert_tokens_to_ids(s) for s in specials}
    eot = ids["<|endoftext|>"]
    cfg = WhisperConfig(vocab_size=len(tok), num_mel_bins=80, d_model=32, encoder_layers=1, decoder_layers=1,
                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                        max_source_positions=1500, max_target_positions=96, pad_token_id=eot, bos_token_id=eot,
                        eos_token_id=eot, decoder_start_token_id=ids["<|startoftranscript|>"])
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(cfg)
    model.generation_config = GenerationConfig(
        decoder_start_token_id=ids["<|startoftranscript|>"], eos_token_id=eot, pad_token_id=eot, bos_token_id=eot,
        max_length=96, is_multilingual=True, lang_to_id={f"<|{c}|>": ids[f"<|{c}|>"] for c in LANGUAGES},
        task_to_id={"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]},
        no_timestamps_token_id=ids["<|notimestamps|>"], begin_suppress_tokens=[], suppress_tokens=[])
    model.save_pretrained(str(path))
    return path


def tiny_ctc_dir(path: str | Path, seed: int = 0) -> Path:
    """A random wav2vec 2.0 CTC model with a character tokenizer and feature extractor."""
    import torch
    from transformers import Wav2Vec2Config, Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "|": 4,
             **{c: 5 + i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZ'")}}
    (path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    Wav2Vec2CTCTokenizer(str(path / "vocab.json")).save_pretrained(str(path))
    Wav2Vec2FeatureExtractor(sampling_rate=16000).save_pretrained(str(path))
    cfg = Wav2Vec2Config(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=37, conv_dim=(32, 32), conv_kernel=(10, 3), conv_stride=(5, 2),
                         num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, do_stable_layer_norm=True,
                         feat_extract_norm="layer", pad_token_id=0)
    torch.manual_seed(seed)
    Wav2Vec2ForCTC(cfg).save_pretrained(str(path))
    return path


__all__ = ["tiny_whisper_dir", "tiny_ctc_dir"]
