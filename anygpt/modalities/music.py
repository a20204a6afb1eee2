"""The music modality: music clips, paired with a caption.

Codes: the default codec is Encodec 32 kHz (``tokenizers/encodec_32khz.yaml``: 4 codebooks of 2048 at
50 Hz), all four codebooks frame-major in the LM (4 ids per frame).
"""
from __future__ import annotations

from anygpt.modalities import register_modality
from anygpt.modalities.plugin import AudioModality


@register_modality
class Music(AudioModality):
    name = "music"
    start, end, prefix = "<somu>", "<eomu>", "🎶"
    default_codec = "encodec_32khz"
    founding = True
    nouns = ("music", "piece", "track")
    x2text_openers = (
        "Describe {the} {noun}.", "Write a caption for {the} {noun}.", "What does {the} {noun} sound like?",
        "Give a short description of {the} {noun}.", "Characterize the style of {the} {noun}.",
        "Tell me about the mood and tempo of {the} {noun}.", "Caption {the} {noun} in one sentence.",
        "Summarize {the} {noun} in words.", "How would you describe {the} {noun}?",
        "Explain what is heard in {the} {noun}.", "Write one line about {the} {noun}.")
    text2x_openers = (
        "Compose {a} {noun} from this description.", "Generate {a} {noun} matching the caption.",
        "Create {a} {noun} that sounds like this.", "Play {a} {noun} as described.",
        "Make {a} {noun} in the following style.", "Produce {a} {noun} for this caption.",
        "Write {a} {noun} fitting the text.", "Perform {a} {noun} following the description.",
        "Turn this caption into {a} {noun}.", "Synthesize {a} {noun} with these features.",
        "Give me {a} {noun} like this.")
    # AnyGPT's release: temperature 1, top-k 200, repetition penalty 1.15 against loops;
    # 2000 ids = 500 frames = 10 s at 50 Hz x 4 codebooks.
    sampling = {"temperature": 1.0, "top_p": 1.0, "top_k": 200, "repetition_penalty": 1.15, "max_tokens": 2000}
    # 10 s = 2000 ids: a 3-minute song would not fit any context (200 music ids per second).
    max_input_seconds = 10.0
