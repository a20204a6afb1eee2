"""The speech modality: spoken language, paired with its transcript.

Codes: the default codec is SpeechTokenizer (``tokenizers/speechtokenizer.yaml``: 16 kHz, 8 RVQ layers
of 1024 at 50 Hz); the LM sees the first (semantic) layer, the shards keep every layer, and a
SoundStorm-style decoder (:mod:`anygpt.decoders.soundstorm`) fills in the acoustic layers before the
codec renders audio, optionally continuing a voice prompt's acoustic codes (voice cloning).
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from anygpt.modalities import register_modality
from anygpt.modalities.plugin import AudioModality


@register_modality
class Speech(AudioModality):
    name = "speech"
    start, end, prefix = "<sosp>", "<eosp>", "🗣️"
    default_codec = "speechtokenizer"
    founding = True
    text_kind = "transcript"
    nouns = ("speech", "recording", "audio clip")
    x2text_openers = (
        "Transcribe {the} {noun}.", "Write down what is said in {the} {noun}.",
        "What words are spoken in {the} {noun}?", "Convert {the} {noun} to text.",
        "Give me the transcript of {the} {noun}.", "Please transcribe {the} {noun} exactly.",
        "Turn {the} {noun} into written text.", "What does the speaker say in {the} {noun}?",
        "Recognize the words in {the} {noun}.", "Write out {the} {noun} as text.",
        "Produce a transcript for {the} {noun}.")
    text2x_openers = (
        "Read the text aloud as {a} {noun}.", "Say the following as {a} {noun}.",
        "Turn this text into {a} {noun}.", "Speak the sentence below as {a} {noun}.",
        "Generate {a} {noun} of the text.", "Produce {a} {noun} reading this.",
        "Convert the text to {a} {noun}.", "Voice the following words as {a} {noun}.",
        "Pronounce this sentence in {a} {noun}.", "Synthesize {a} {noun} saying this.",
        "Create {a} {noun} that says the text.")
    # AnyGPT's release: temperature 1, repetition penalty 1.05; 1500 ids = 30 s at 50 Hz.
    sampling = {"temperature": 1.0, "top_p": 1.0, "repetition_penalty": 1.05, "max_tokens": 1500}
    # 30 s = 1500 ids (AnyGPT's speech budget); a voice prompt needs only a few seconds of the voice.
    max_input_seconds = 30.0
    prompt_max_seconds = 10.0
    acoustic_prompt = True

    def complete_codes(self, lm_codes: np.ndarray, acoustic: Callable[[], Any], prompt: np.ndarray | None,
                       notes: list[str], seed: int | None = None) -> np.ndarray:
        """The LM's leading codebooks ``[S, T]`` (S = the card's ``lm_codebooks``: one semantic layer for
        SpeechTokenizer and Mimi) -> all RVQ layers ``[K, T]`` through the SoundStorm decoder (or the LM's
        layers alone, with a note, when there is none)."""
        import torch

        decoder = acoustic()
        semantic = np.asarray(lm_codes, dtype=np.int64)
        semantic = semantic[None] if semantic.ndim == 1 else semantic
        if decoder is None:
            notes.append("no SoundStorm decoder (--soundstorm DIR): speech is rendered from the semantic layer "
                         "only (expect muffled audio)")
            return semantic
        voice = None
        if prompt is not None:
            n_q = decoder.config.num_quantizers
            if prompt.shape[0] < n_q:
                notes.append(f"voice prompt has {prompt.shape[0]} layers, SoundStorm needs {n_q}: ignored")
            else:
                voice = torch.as_tensor(prompt[:n_q])
        out = decoder.generate(torch.as_tensor(semantic)[None], prompt=voice, seed=seed)  # [1, S, T] -> [1, K, T]
        return out[0].cpu().numpy().astype(np.int64)
