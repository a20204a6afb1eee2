"""anygpt: train and serve any-to-any multimodal language models on discrete tokens (AnyGPT-style)."""
__version__ = "0.1.0"
