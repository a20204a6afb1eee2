"""Modality codecs and their registry.

``build_codec("speech", "tiny")`` builds the tiny random codec (same code path as the real one);
``build_codec("speech", "/ckpt/speechtokenizer")`` loads a real checkpoint directory described by
its card.  A codec class registers itself with ``@register_codec``; adding a modality means one
module plus one card in ``tokenizers/``.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Callable

from anygpt.modalities.base import Codec, CodecError

# name -> module that defines and registers the codec (imported lazily: codec modules pull in
# heavy model code that most commands never need).
_CODEC_MODULES = {
    "speech": "anygpt.modalities.speech",
    "music": "anygpt.modalities.music",
    "image": "anygpt.modalities.image",
}
_REGISTRY: dict[str, type[Codec]] = {}


def register_codec(name: str) -> Callable[[type[Codec]], type[Codec]]:
    def wrap(cls: type[Codec]) -> type[Codec]:
        cls.modality = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def codec_class(name: str) -> type[Codec]:
    if name not in _REGISTRY:
        if name not in _CODEC_MODULES:
            raise CodecError(f"unknown modality {name!r}; known: {sorted(_CODEC_MODULES)}")
        importlib.import_module(_CODEC_MODULES[name])
    return _REGISTRY[name]


def build_codec(name: str, source: str | Path = "tiny", **kwargs) -> Codec:
    """Build codec ``name`` from ``"tiny"`` (random, small) or a checkpoint directory."""
    cls = codec_class(name)
    if str(source) == "tiny":
        return cls.tiny(**kwargs)
    return cls.from_dir(Path(source), **kwargs)


def load_codecs(codecs_dir: str | Path | None, modalities=("speech", "music", "image"), **kwargs) -> dict[str, Codec]:
    """Load ``codecs_dir/<modality>/`` for each modality (or tiny codecs when ``codecs_dir`` is None)."""
    out = {}
    for m in modalities:
        if codecs_dir is None:
            out[m] = build_codec(m, "tiny", **kwargs)
        else:
            sub = Path(codecs_dir) / m
            if not sub.is_dir():
                raise CodecError(f"{codecs_dir}: no '{m}/' codec directory (expected one per modality)")
            out[m] = build_codec(m, sub, **kwargs)
    return out


__all__ = ["Codec", "CodecError", "register_codec", "codec_class", "build_codec", "load_codecs"]
