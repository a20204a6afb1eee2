"""The one contract every codec implements.

A codec turns media into integer codes and back.  Codes always carry the codebook axis:
``[num_codebooks, T]`` (SpeechTokenizer: 8 RVQ layers x 50 Hz frames; Encodec: 4 codebooks x 50 Hz
frames; SEED: 1 x 32 ids).  The card's ``lm_codebooks`` says how many leading codebooks the LM sees
(SpeechTokenizer: layer 1 only; Encodec: all 4); shards keep all of them because an acoustic decoder
(SoundStorm) trains on the rest.

Besides ``encode``/``decode`` the contract holds what ``anygpt codec fit`` needs to seed a tiny
codec's codebooks from data: :meth:`Codec.fit_vectors` (what the first codebook quantises) and
:meth:`Codec.codebooks` (the codebook modules, first to last; residual codebooks are fitted in
order on what the previous ones leave).  A codec whose quantiser is split into several residual
chains fed from the same latent (Mimi: one semantic RVQ + one acoustic RVQ, each with its own input
projection) overrides :meth:`Codec.fit_chains`; a codebook whose storage ``fit`` cannot write
directly (derived ``embed``, caches) offers ``set_codebook(centroids, counts)``.
"""
from __future__ import annotations

import abc
import threading
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import numpy as np
import torch

from anygpt.modalities.plugin import CodecError

_TINY_BUILD_LOCK = threading.Lock()


class Codec(torch.nn.Module, abc.ABC):
    """Base class: ``encode(batch) -> list[codes]`` and ``decode(list[codes]) -> batch``.

    Attributes:
        card_name: the name of the codec's card in ``tokenizers/`` (``speechtokenizer``).
        card: the card this codec was built from (``card["modality"]`` is its modality).
        sample_rate: audio sample rate the codec consumes/produces (``None`` for images).
        frame_rate: code frames per second (``None`` for images).
        num_codebooks: codebooks produced by ``encode`` (the codebook axis of the codes).
        codebook_size: ids per codebook.
    """

    card_name: ClassVar[str]
    card: dict[str, Any]
    sample_rate: int | None = None
    frame_rate: float | None = None
    num_codebooks: int
    codebook_size: int

    @property
    def modality(self) -> str:
        return str(self.card["modality"])

    @property
    def lm_codebooks(self) -> int:
        """Leading codebooks the LM sees (the card's ``lm_codebooks``)."""
        return int(self.card["lm_codebooks"])

    @abc.abstractmethod
    def encode(self, items: Sequence[Any]) -> list[np.ndarray]:
        """Encode a batch of media (what the modality's ``read`` returns: waveforms at ``sample_rate``,
        PIL images ...).  Returns one int64 array ``[num_codebooks, T]`` per item."""

    @abc.abstractmethod
    def decode(self, codes: Sequence[np.ndarray], **options: Any) -> list[Any]:
        """Decode a batch of ``[K, T]`` code arrays back to media (``options``: the modality's
        ``render_options``, e.g. diffusion steps for images)."""

    @classmethod
    @abc.abstractmethod
    def tiny(cls, **kwargs: Any) -> "Codec":
        """A small randomly initialised codec with the real architecture (tests, demo)."""

    @classmethod
    def official(cls, **kwargs: Any) -> "Codec":
        """The released architecture at full size with random weights (benchmarks: speed does not
        depend on the weight values)."""
        raise CodecError(f"{cls.__name__}: no full-size architecture to build")

    @classmethod
    @abc.abstractmethod
    def from_dir(cls, directory: Path, **kwargs: Any) -> "Codec":
        """Load from a checkpoint directory (card + weights); missing files raise ``CodecError``."""

    @abc.abstractmethod
    def save(self, directory: str | Path, **card_updates: Any) -> None:
        """Write card + weights so that loading ``directory`` restores this codec."""

    def fit_vectors(self, items: Sequence[Any]) -> torch.Tensor:
        """Rows ``[N, D]`` that the first codebook quantises, for the items (k-means input of
        ``anygpt codec fit``).  Codecs that cannot be fitted leave this unimplemented."""
        raise CodecError(f"{type(self).__name__}: this codec has no codebooks to fit")

    def codebooks(self) -> list[Any]:
        """The codebook modules in quantisation order, i.e. the order of the codes' codebook axis
        (``nn.Embedding``, EMA codebooks with ``embed``, or objects with ``set_codebook(centroids,
        counts)``)."""
        raise CodecError(f"{type(self).__name__}: this codec has no codebooks to fit")

    def fit_chains(self, items: Sequence[Any]) -> list[tuple[torch.Tensor, list[Any]]]:
        """``(vectors [N, D], codebooks)`` per residual chain: each chain's first codebook is fitted on
        its vectors, the next ones on what the previous ones leave.  Together the chains hold
        :meth:`codebooks` in order.  Default: one chain, :meth:`fit_vectors` through every codebook."""
        return [(self.fit_vectors(items), self.codebooks())]

    @classmethod
    def _tiny_from(cls, build: Callable[[], "Codec"], seed: int | None, device: Any = None) -> "Codec":
        """Build a tiny codec with deterministic weights for ``seed`` without touching the caller's RNG.
        One build at a time: the seeded initialisation draws from torch's global generator, which codecs
        built on two threads at once (the demo fits its codecs in parallel) would share."""
        with _TINY_BUILD_LOCK, torch.random.fork_rng(devices=[]):
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


class AudioCodec(Codec):
    """What waveform codecs share, around three tensor methods a subclass implements:
    ``encode_batch(wav [B, 1, L]) -> codes [B, K, T]``, ``decode_batch(codes [B, K', T]) -> wav
    [B, 1, T * hop_length]`` and ``embeddings(wav [B, 1, L]) -> [B, D, T]`` (what the first codebook
    quantises; ``fit_vectors`` reads it).

    Frames: ``T = ceil(samples / hop_length)``.  Batching: with ``pad_batches`` every item of a batch
    runs in one zero-padded pass (faster; the codes near a shorter item's end may then depend on its
    neighbours); otherwise only items of equal length share a pass, so an item's codes are the codes it
    gets alone (bidirectional LSTMs would see the padding).  ``decodes_prefixes``: ``decode`` accepts
    any number of leading codebooks (RVQ speech codecs render from layer 1 alone), else exactly all.
    """

    hop_length: int
    pad_batches: bool = False
    use_half: bool = False
    decodes_prefixes: ClassVar[bool] = True

    def num_frames(self, num_samples: int) -> int:
        return -(-int(num_samples) // self.hop_length)

    def _autocast(self):
        """fp16 autocast of the conv/LSTM stacks on CUDA when ``use_half`` (quantiser distances stay fp32)."""
        enabled = self.use_half and self.device.type == "cuda"
        return torch.autocast(device_type=self.device.type, dtype=torch.float16, enabled=enabled)

    def passes(self, lengths: Sequence[int]) -> list[list[int]]:
        """Indices of a batch grouped into forward passes (see the class docstring)."""
        from anygpt.modalities.media import group_by_length

        return group_by_length(lengths, self.pad_batches)

    def encode(self, items: Sequence[Any]) -> list[np.ndarray]:
        """1-D float waveforms at ``sample_rate`` (or audio file paths) -> ``[K, T]`` int64 arrays."""
        from anygpt.modalities.media import coerce_audio, padded_batch

        wavs = [coerce_audio(w, self.sample_rate, f"{self.modality} item {i}") for i, w in enumerate(items)]
        out: list[np.ndarray | None] = [None] * len(wavs)
        for group in self.passes([len(w) for w in wavs]):
            codes = self.encode_batch(padded_batch(wavs, group)).cpu()
            for row, i in enumerate(group):
                out[i] = codes[row, :, : self.num_frames(len(wavs[i]))].numpy().astype(np.int64)
        return out  # type: ignore[return-value]

    def decode(self, codes: Sequence[np.ndarray], **options: Any) -> list[np.ndarray]:
        """``[K, T]`` arrays -> 1-D float32 waveforms of ``T * hop_length`` samples."""
        arrs = []
        want = f"K<={self.num_codebooks}" if self.decodes_prefixes else str(self.num_codebooks)
        for i, c in enumerate(codes):
            a = np.asarray(c)
            a = a[None] if a.ndim == 1 and self.decodes_prefixes else a
            ok = a.ndim == 2 and (1 <= a.shape[0] <= self.num_codebooks if self.decodes_prefixes
                                  else a.shape[0] == self.num_codebooks)
            if not ok:
                raise CodecError(f"{self.modality} codes item {i}: expected [{want}, T], got {a.shape}")
            arrs.append(a.astype(np.int64))
        out: list[np.ndarray | None] = [None] * len(arrs)
        groups: dict[tuple, list[int]] = {}
        for i, a in enumerate(arrs):
            groups.setdefault(a.shape, []).append(i)
        for group in groups.values():
            wav = self.decode_batch(torch.from_numpy(np.stack([arrs[i] for i in group]))).cpu()
            for row, i in enumerate(group):
                out[i] = wav[row, 0].numpy().astype(np.float32)
        return out  # type: ignore[return-value]

    def fit_vectors(self, items: Sequence[Any]) -> torch.Tensor:
        """Encoder output frames ``[N, D]`` of the items (what the first codebook quantises)."""
        from anygpt.modalities.media import coerce_audio

        rows = []
        for i, item in enumerate(items):
            wav = torch.from_numpy(coerce_audio(item, self.sample_rate, f"{self.modality} item {i}"))[None, None]
            rows.append(self.embeddings(wav)[0, :, : self.num_frames(wav.shape[-1])].t().cpu())
        return torch.cat(rows).float()

    def _check_range(self, codes: torch.Tensor) -> None:
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise CodecError(f"{self.modality} codes must lie in [0, {self.codebook_size}); got "
                             f"[{int(codes.min())}, {int(codes.max())}]")


class TransformersAudioCodec(AudioCodec):
    """A waveform codec that *is* a transformers model (Encodec, Mimi): built from a config dict,
    loaded strictly from a ``save_pretrained``-layout directory, saved with ``save_pretrained``.

    A subclass names its transformers classes (``model_class``, ``config_class``), its ``tiny`` and
    ``official`` configs and the facts its card must agree with (``checked_facts``); its constructor
    takes ``(model, card=..., **options)``.
    """

    model_class: ClassVar[str]
    config_class: ClassVar[str]
    tiny_config: ClassVar[dict[str, Any]]
    official_config: ClassVar[dict[str, Any]]
    load_options: ClassVar[dict[str, Any]] = {}
    """Extra ``from_pretrained`` arguments."""
    checked_facts: ClassVar[tuple[str, ...]] = ("sample_rate", "frame_rate", "codebook_size")

    @classmethod
    def _build(cls, config: dict[str, Any]) -> Any:
        import transformers

        from anygpt.model import quiet_transformers

        with quiet_transformers():
            return getattr(transformers, cls.model_class)(getattr(transformers, cls.config_class)(**config))

    @classmethod
    def tiny(cls, *, seed: int | None = 0, **kwargs: Any) -> "TransformersAudioCodec":
        """The small random config (same transformers code path); ``config={...}`` overrides its keys."""
        overrides = kwargs.pop("config", {}) or {}
        device = kwargs.pop("device", None)
        return cls._tiny_from(lambda: cls(cls._build({**cls.tiny_config, **overrides}), **kwargs), seed, device)

    @classmethod
    def official(cls, **kwargs: Any) -> "TransformersAudioCodec":
        """The released architecture, randomly initialised (for benchmarks: no download)."""
        device = kwargs.pop("device", None)
        codec = cls(cls._build(dict(cls.official_config)), **kwargs)
        return codec.to(device) if device is not None else codec

    @classmethod
    def unused_keys(cls, model: Any, info: dict[str, Any], weights: Path) -> list[str]:
        """Checkpoint keys the model does not use (default: what ``from_pretrained`` reports)."""
        return sorted(info.get("unexpected_keys") or [])

    @classmethod
    def from_dir(cls, directory: Path | str, card: dict[str, Any] | None = None,
                 **kwargs: Any) -> "TransformersAudioCodec":
        """Load a local directory (``config.json`` + weights); nothing is downloaded.

        Missing or mis-shaped weights are a ``CodecError`` (``from_pretrained`` alone would leave
        random weights in place); keys the model does not use are reported once and ignored.
        """
        import transformers

        from anygpt.model import quiet_transformers
        from anygpt.modalities.cards import (card_label, check_codec_matches, dir_card, named_card, report_unused,
                                             resolve_files)

        directory = Path(directory)
        card = card or dir_card(directory) or named_card(cls.card_name)
        files = resolve_files(card, directory)
        device = kwargs.pop("device", None)
        try:
            with quiet_transformers():
                model, info = getattr(transformers, cls.model_class).from_pretrained(
                    str(directory), output_loading_info=True, local_files_only=True, **cls.load_options)
        except Exception as exc:
            raise CodecError(f"{card_label(card)}: cannot load {directory} "
                             f"({' '.join(str(exc).split())[:300]})") from None
        bad = []
        if info.get("missing_keys"):
            bad.append(f"{len(info['missing_keys'])} missing keys (e.g. {sorted(info['missing_keys'])[:3]})")
        if info.get("mismatched_keys"):
            shapes = [f"{k} {tuple(a)} vs {tuple(b)}" for k, a, b in sorted(info["mismatched_keys"])[:3]]
            bad.append(f"{len(info['mismatched_keys'])} shape mismatches (e.g. {shapes})")
        if bad:
            raise CodecError(f"{card_label(card)}: {files['weights']} does not match {files['config'].name}: "
                             f"{'; '.join(bad)}")
        unused = cls.unused_keys(model, info, files["weights"])
        if unused:
            report_unused(card, files["weights"], unused)
        codec = cls(model, card=card, **kwargs)
        check_codec_matches(card, **{fact: getattr(codec, fact) for fact in cls.checked_facts})
        return codec.to(device) if device is not None else codec

    def save(self, directory: str | Path, **card_updates: Any) -> None:
        """``save_pretrained`` (config.json + model.safetensors) + ``card.yaml``."""
        from anygpt.model import quiet_transformers
        from anygpt.modalities.cards import write_card

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with quiet_transformers():
            self.model.save_pretrained(str(directory))
        write_card(self.card, directory, **card_updates)


__all__ = ["TransformersAudioCodec", "Codec", "AudioCodec", "CodecError"]
