"""The image modality: pictures, paired with a caption.

Codes: the default codec is the SEED-2 tokenizer (``tokenizers/seed_tokenizer_2.yaml``: exactly 32
ids of 8192 per image); decoding goes codes -> unCLIP image embedding -> Stable unCLIP pixels, with
the renderer's denoising steps and guidance as options.
"""
from __future__ import annotations

from anygpt.modalities import register_modality
from anygpt.modalities.plugin import ImageModality


@register_modality
class Image(ImageModality):
    name = "image"
    start, end, prefix = "<soim>", "<eoim>", "👀"
    default_codec = "seed_tokenizer_2"
    founding = True
    nouns = ("image", "picture", "photo")
    x2text_openers = (
        "Describe {the} {noun}.", "Write a caption for {the} {noun}.", "What does {the} {noun} show?",
        "Give a short description of {the} {noun}.", "Summarize what is in {the} {noun}.",
        "Tell me what you see in {the} {noun}.", "Caption {the} {noun} in one sentence.",
        "Explain the content of {the} {noun}.", "Write one line about {the} {noun}.",
        "What is depicted in {the} {noun}?", "Provide a brief caption for {the} {noun}.")
    text2x_openers = (
        "Draw {a} {noun} of the following.", "Generate {a} {noun} from this description.",
        "Create {a} {noun} that matches the text.", "Paint {a} {noun} as described.",
        "Make {a} {noun} showing this.", "Render {a} {noun} for the caption below.",
        "Produce {a} {noun} based on the text.", "Illustrate the description as {a} {noun}.",
        "Show me {a} {noun} of this.", "Turn this caption into {a} {noun}.",
        "Sketch {a} {noun} following the description.")
    # SEED codes were sampled at temperature 1 in AnyGPT's release (lower collapses to flat colour);
    # a span is always the card's 32 ids.
    sampling = {"temperature": 1.0, "top_p": 1.0, "max_tokens": 32}
    render_options = {"steps": (int, "unCLIP denoising steps (renderer default 25)"),
                      "guidance": (float, "unCLIP guidance scale (default 10)"),
                      "seed": (int, "unCLIP sampling seed")}
