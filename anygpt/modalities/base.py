"""The one contract every modality codec implements.

A codec turns media into integer codes and back.  Codes always carry the codebook axis:
``[num_codebooks, T]`` (speech: 8 RVQ layers x 50 Hz frames; music: 4 Encodec codebooks x 50 Hz
frames; image: 1 x 32 SEED ids).  The vocabulary layout decides how many leading codebooks the LM
sees (speech: layer 1 only; music: all 4; image: 1); shards keep all of them because the speech
decoder trains on layers 2-8.
"""
from __future__ import annotations

import abc
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import numpy as np
import torch


class CodecError(ValueError):
    """A codec could not be built or loaded (missing/mismatched checkpoint, bad card)."""


class Codec(torch.nn.Module, abc.ABC):
    """Base class: ``encode(batch) -> list[codes]`` and ``decode(list[codes]) -> batch``.

    Attributes:
        modality: registry name (``speech``, ``music``, ``image``).
        sample_rate: audio sample rate the codec consumes/produces (``None`` for images).
        frame_rate: code frames per second (``None`` for images).
        num_codebooks: codebooks produced by ``encode`` (the codebook axis of the codes).
        codebook_size: ids per codebook.
    """

    modality: ClassVar[str]
    sample_rate: int | None = None
    frame_rate: float | None = None
    num_codebooks: int
    codebook_size: int

    @abc.abstractmethod
    def encode(self, items: Sequence[Any]) -> list[np.ndarray]:
        """Encode a batch of media (1-D float waveforms at ``sample_rate``, or PIL images).

        Returns one int64 array ``[num_codebooks, T]`` per item.
        """

    @abc.abstractmethod
    def decode(self, codes: Sequence[np.ndarray]) -> list[Any]:
        """Decode a batch of ``[K, T]`` code arrays back to media (waveforms or PIL images)."""

    @classmethod
    @abc.abstractmethod
    def tiny(cls, **kwargs: Any) -> "Codec":
        """A small randomly initialised codec with the real architecture (tests, demo)."""

    @classmethod
    @abc.abstractmethod
    def from_dir(cls, directory: Path, **kwargs: Any) -> "Codec":
        """Load from a checkpoint directory (card + weights); missing files raise ``CodecError``."""

    @abc.abstractmethod
    def save(self, directory: str | Path) -> None:
        """Write card + weights so that ``build_codec(modality, directory)`` restores this codec."""

    @classmethod
    def _tiny_from(cls, build: Callable[[], "Codec"], seed: int | None, device: Any = None) -> "Codec":
        """Build a tiny codec with deterministic weights for ``seed`` without touching the caller's RNG."""
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            codec = build()
        codec.card = {**getattr(codec, "card", {}), "tiny": True}
        return codec.to(device) if device is not None else codec

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        return torch.device("cpu")
