"""Reading and writing media for the codecs: audio through ``soundfile`` + ``soxr``, images through Pillow.

Why these libraries: ``soundfile`` (libsndfile) reads WAV/FLAC/OGG/MP3/AIFF/... without ``torchaudio``
(which cannot load next to the pinned torch, see PLATFORM.md), and ``soxr`` is a real band-limited
resampler (naive interpolation aliases badly when 44.1/48 kHz music goes down to 16 kHz speech).

Every failure on *input* -- unreadable or empty file, zero-length audio, no channels, NaN samples,
truncated or undecodable image -- raises :class:`MediaError` with a one-line message that names the
file, so the data pipeline can catch exactly one type, count it by reason and log it.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO, Sequence, Union

import numpy as np

PathOrFile = Union[str, os.PathLike, BinaryIO]

# CLIP/SEED preprocessing constants live here because both the image codec and callers that
# prepare pixels themselves (e.g. benchmarks) need them.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class MediaError(ValueError):
    """An input file could not be turned into media (the message names the file)."""


def source_name(src: Any) -> str:
    """A file's name for messages: the path, a stream's ``name``, or ``<stream>``."""
    if isinstance(src, (str, os.PathLike)):
        return str(src)
    return str(getattr(src, "name", "<stream>"))


def one_line(exc: BaseException) -> str:
    """An exception as one line (for one-line error messages)."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


# ----------------------------------------------------------------------------------------- audio


@dataclass
class AudioInfo:
    """What :func:`load_audio` did to a file (kept in shard metadata and error logs)."""

    path: str
    orig_sample_rate: int
    orig_channels: int
    orig_seconds: float
    sample_rate: int
    seconds: float
    truncated: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def to_mono(wav: np.ndarray) -> np.ndarray:
    """Average channels of a ``[frames, channels]`` (or 1-D) array into one float32 channel.

    Averaging (not taking channel 0) keeps content that is panned to one side, and works for any
    channel count (5.1, odd multichannel recordings).
    """
    wav = np.asarray(wav, dtype=np.float32)
    if wav.ndim == 1:
        return wav
    if wav.ndim != 2:
        raise ValueError(f"expected [frames, channels] audio, got shape {wav.shape}")
    return wav.mean(axis=1, dtype=np.float32)


def resample(wav: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """Band-limited resampling with soxr ("HQ" quality); a no-op when the rates match."""
    wav = np.asarray(wav, dtype=np.float32)
    if int(orig_sr) == int(target_sr) or wav.size == 0:
        return wav
    import soxr  # imported here: only needed when rates differ

    return np.asarray(soxr.resample(wav, int(orig_sr), int(target_sr), quality="HQ"), dtype=np.float32)


def clip_audio(wav: np.ndarray, sample_rate: int, max_seconds: float | None) -> tuple[np.ndarray, bool]:
    """Keep at most ``max_seconds`` of ``wav``; returns ``(wav, truncated)``."""
    if max_seconds is None:
        return wav, False
    limit = int(round(float(max_seconds) * sample_rate))
    if wav.shape[0] > limit:
        return wav[:limit], True
    return wav, False


def load_audio(
    src: PathOrFile,
    sample_rate: int,
    *,
    max_seconds: float | None = None,
    min_samples: int = 1,
) -> tuple[np.ndarray, AudioInfo]:
    """Read any libsndfile format, down-mix to mono, resample to ``sample_rate``, clip to ``max_seconds``.

    Returns ``(wav, info)`` with ``wav`` a 1-D float32 array in [-1, 1] and ``info`` saying whether
    the clip was truncated.  Raises :class:`MediaError` naming the file on any bad input.
    """
    import soundfile as sf

    name = source_name(src)
    if isinstance(src, (str, os.PathLike)):
        p = Path(src)
        if not p.is_file():
            raise MediaError(f"{name}: no such audio file")
        if p.stat().st_size == 0:
            raise MediaError(f"{name}: empty file (0 bytes)")
    try:
        data, sr = sf.read(src, dtype="float32", always_2d=True)
    except Exception as exc:  # soundfile raises LibsndfileError/RuntimeError/TypeError variants
        raise MediaError(f"{name}: cannot read audio ({one_line(exc)})") from None
    if data.shape[1] < 1:
        raise MediaError(f"{name}: audio has no channels")
    if data.shape[0] < min_samples:
        raise MediaError(f"{name}: zero-length audio ({data.shape[0]} samples)")
    if not np.isfinite(data).all():
        raise MediaError(f"{name}: audio contains NaN or infinite samples")
    orig_channels = int(data.shape[1])
    orig_seconds = data.shape[0] / float(sr)
    wav = to_mono(data)
    # Clip before resampling when possible: cheaper for long files (keep a little margin so the
    # resampler's edge does not land exactly on the cut).
    if max_seconds is not None:
        wav, _ = clip_audio(wav, sr, float(max_seconds) + 0.1)
    wav = resample(wav, sr, sample_rate)
    wav, truncated = clip_audio(wav, sample_rate, max_seconds)
    truncated = truncated or (max_seconds is not None and orig_seconds > float(max_seconds) + 1e-9)
    if wav.shape[0] < 1:
        raise MediaError(f"{name}: zero-length audio after resampling to {sample_rate} Hz")
    info = AudioInfo(
        path=name,
        orig_sample_rate=int(sr),
        orig_channels=orig_channels,
        orig_seconds=orig_seconds,
        sample_rate=int(sample_rate),
        seconds=wav.shape[0] / float(sample_rate),
        truncated=bool(truncated),
    )
    return np.ascontiguousarray(wav, dtype=np.float32), info


def save_audio(path: str | os.PathLike, wav: np.ndarray, sample_rate: int) -> Path:
    """Write a mono float waveform; the format follows the suffix (.wav/.flac/.ogg), 16-bit PCM for WAV."""
    import soundfile as sf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wav = np.asarray(wav, dtype=np.float32).reshape(-1)
    wav = np.clip(wav, -1.0, 1.0)
    subtype = "PCM_16" if path.suffix.lower() in (".wav", "") else None
    sf.write(str(path), wav, int(sample_rate), subtype=subtype)
    return path


def as_waveform(item: Any, name: str = "<array>") -> np.ndarray:
    """Turn an in-memory waveform (numpy/torch, 1-D or ``[channels, T]``) into 1-D float32.

    Codecs accept waveforms already at their sample rate; this only validates and down-mixes
    (channels-first, as torch audio code produces them).
    """
    if hasattr(item, "detach"):
        item = item.detach().cpu().numpy()
    wav = np.asarray(item, dtype=np.float32)
    if wav.ndim == 2:
        if wav.shape[0] > wav.shape[1]:
            raise MediaError(f"{name}: expected [channels, samples] audio, got shape {wav.shape}")
        wav = wav.mean(axis=0)
    elif wav.ndim != 1:
        raise MediaError(f"{name}: expected a 1-D waveform, got shape {wav.shape}")
    if wav.shape[0] == 0:
        raise MediaError(f"{name}: zero-length audio")
    if not np.isfinite(wav).all():
        raise MediaError(f"{name}: audio contains NaN or infinite samples")
    return wav


def coerce_audio(item: Any, sample_rate: int, name: str = "<array>") -> np.ndarray:
    """A codec input as a 1-D float32 waveform: paths are read with :func:`load_audio` (resampled to
    ``sample_rate``), arrays/tensors are taken to be at ``sample_rate`` already."""
    if isinstance(item, (str, os.PathLike)):
        return load_audio(item, sample_rate)[0]
    return as_waveform(item, name)


# ----------------------------------------------------------------------------------------- images


def _to_rgb(img: "Image.Image") -> "Image.Image":
    """Convert any Pillow mode to RGB; transparent pixels are composited on white.

    Plain ``convert("RGB")`` would turn transparent backgrounds black and clip 16-bit/float images.
    """
    from PIL import Image

    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode in ("I", "F") or mode.startswith("I;"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scaled = np.zeros_like(arr) if hi <= lo else (arr - lo) / (hi - lo) * 255.0
        return Image.fromarray(scaled.round().astype(np.uint8), mode="L").convert("RGB")
    return img.convert("RGB")


def load_image(src: PathOrFile | "Image.Image", *, name: str | None = None) -> "Image.Image":
    """Open an image, apply its EXIF orientation, convert to RGB; :class:`MediaError` on bad input.

    The pixels are fully decoded here (``load()``) so a truncated file fails now, naming the file,
    rather than later inside a batch.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    label = name or source_name(src)
    if isinstance(src, Image.Image):
        img = src
    else:
        if isinstance(src, (str, os.PathLike)):
            p = Path(src)
            if not p.is_file():
                raise MediaError(f"{label}: no such image file")
            if p.stat().st_size == 0:
                raise MediaError(f"{label}: empty file (0 bytes)")
        try:
            img = Image.open(src)
            img.load()
        except UnidentifiedImageError:
            raise MediaError(f"{label}: not a recognised image format") from None
        except Image.DecompressionBombError as exc:
            raise MediaError(f"{label}: image too large ({one_line(exc)})") from None
        except (OSError, ValueError, SyntaxError) as exc:  # truncated/corrupt data
            raise MediaError(f"{label}: cannot decode image ({one_line(exc)})") from None
    if img.width < 1 or img.height < 1:
        raise MediaError(f"{label}: image has zero size {img.size}")
    try:
        img = ImageOps.exif_transpose(img)
    except Exception as exc:  # malformed EXIF blocks
        raise MediaError(f"{label}: bad EXIF data ({one_line(exc)})") from None
    try:
        return _to_rgb(img)
    except Exception as exc:
        raise MediaError(f"{label}: cannot convert {img.mode} image to RGB ({one_line(exc)})") from None


def save_image(path: str | os.PathLike, img: "Image.Image") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def image_to_tensor(images: Sequence["Image.Image"], size: int = 224) -> "torch.Tensor":
    """SEED/CLIP preprocessing: bicubic resize to ``size``x``size`` (no crop), scale to [0,1], CLIP mean/std.

    Written with Pillow + numpy so no torchvision is needed.  Returns ``[B, 3, size, size]`` float32.
    """
    import torch
    from PIL import Image

    arrs = []
    for img in images:
        img = _to_rgb(img).resize((size, size), resample=Image.BICUBIC)
        arrs.append(np.asarray(img, dtype=np.float32) / 255.0)
    x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - mean) / std


def padded_batch(wavs: Sequence[np.ndarray], group: Sequence[int]) -> "torch.Tensor":
    """``wavs[i]`` for ``i`` in ``group`` as one zero-padded ``[B, 1, L]`` tensor (L = longest)."""
    import torch

    batch = torch.zeros(len(group), 1, max(len(wavs[i]) for i in group))
    for row, i in enumerate(group):
        batch[row, 0, : len(wavs[i])] = torch.from_numpy(wavs[i])
    return batch


def group_by_length(lengths: Sequence[int], pad: bool) -> list[list[int]]:
    """Indices of a batch grouped so that each group runs as one forward pass.

    Without padding only equal-length items share a pass, so an item's codes never depend on
    what else was in its batch (the speech encoder has a bidirectional LSTM: zero padding would
    change every frame).  With ``pad=True`` everything runs in one padded pass (faster, and the
    caller trims each item's codes to its own length).
    """
    if pad:
        return [list(range(len(lengths)))] if lengths else []
    groups: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        groups.setdefault(int(n), []).append(i)
    return list(groups.values())


__all__ = [
    "MediaError",
    "source_name",
    "one_line",
    "AudioInfo",
    "CLIP_MEAN",
    "CLIP_STD",
    "load_audio",
    "save_audio",
    "to_mono",
    "resample",
    "clip_audio",
    "as_waveform",
    "coerce_audio",
    "load_image",
    "save_image",
    "image_to_tensor",
    "group_by_length",
    "padded_batch",
]
