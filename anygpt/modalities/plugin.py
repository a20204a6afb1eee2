"""The modality plugin contract: everything the rest of the system knows about one modality.

A modality is one subclass of :class:`Modality` (decorated with
:func:`anygpt.modalities.register_modality`) plus the card(s) of its codec(s).  The plugin owns:

- its **layout facts**: span markers, the AnyGPT release token prefix, and (from its codec's card)
  the codebooks the LM sees, their size and a fixed span length;
- its **media files**: which suffixes it reads, how a file becomes codec input (:meth:`read`) and how
  decoded media becomes a file (:meth:`write`);
- its **words**: nouns and instruction openers of the stage-1 templates, whether its paired text is
  a transcript or a caption;
- its **generation defaults** (sampling settings inside its spans) and input limits;
- which **codec** it uses by default (a card name); the card names the codec class, so a second
  codec for a modality is one module plus one card.

Everything else (the default layout, task names, media I/O, CLI choices, preprocessing, eval, the
demo, export) iterates the registry and asks the plugin.  This module is light on purpose (no torch):
the CLI builds its choices from it.

Two families are provided, :class:`AudioModality` and :class:`ImageModality`; a new kind of media
subclasses :class:`Modality` directly (``tests/toy_modality.py`` shows one).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, ClassVar, Union

import numpy as np

from anygpt.modalities import media

Source = Union[str, os.PathLike, BinaryIO]


class CodecError(ValueError):
    """A codec could not be built or loaded (missing/mismatched checkpoint, bad card)."""


class MediaRejected(media.MediaError):
    """A readable input that a filter rejects; ``reason`` is the data pipeline's skip reason."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True)
class ReadOptions:
    """What a read may be asked for besides the file; each family uses the fields that concern it.

    Attributes:
        start, end: a segment of a longer recording, in seconds (audio).
        min_seconds, max_seconds: reject audio whose original duration is outside (``too_short`` /
            ``too_long``), checked from the file header before decoding.
        clip_seconds: keep at most this many seconds (audio; ``truncated`` in the info).
        min_side, max_aspect_ratio: reject small or extreme images (``image_too_small`` /
            ``bad_aspect_ratio``).
    """

    start: float | None = None
    end: float | None = None
    min_seconds: float | None = None
    max_seconds: float | None = None
    clip_seconds: float | None = None
    min_side: int | None = None
    max_aspect_ratio: float | None = None


class Modality:
    """Base class of a modality plugin; subclasses set the class attributes and the media hooks.

    Attributes:
        name: registry name (``speech``); also the shard member stem (``speech.npy``) and task names
            (``speech2text``, ``text2speech``).
        start, end: span marker tokens (``<sosp>`` / ``<eosp>``).
        prefix: AnyGPT's release token prefix (``<🗣️N>`` tokens), used when a layout is read from
            a release tokenizer and for the added tokens of saved tokenizers.
        default_codec: card name of the codec a run uses when its codecs directory does not say.
        founding: True only for the three modalities of the first layout, whose markers all precede
            all their ranges; every later modality appends its own markers, then its range, so no
            existing id ever moves.
        text_kind: ``"transcript"`` (the paired text is what is said: ASR/TTS metrics apply) or
            ``"caption"`` (the text describes it: captioning metrics).
        nouns, x2text_openers, text2x_openers: the words of the stage-1 instruction pools
            (``{the}``/``{a}`` and ``{noun}`` are filled in; see :mod:`anygpt.formats.templates`).
        sampling: sampling settings inside this modality's spans (fields of
            :class:`anygpt.infer.settings.SamplingSettings`; ``max_tokens`` counts ids per span).
        max_input_seconds: longest input a chat or task accepts (longer inputs are cut, with a note).
        suffixes: file suffixes this modality reads; ``output_suffix``: what :meth:`write` produces.
        render_options: decode keyword options the command line exposes as ``--{name}-{option}``
            (option -> (type, help)); the image renderer's ``steps`` and ``guidance``.
        acoustic_prompt: the modality accepts a prompt recording whose codes condition decoding
            (speech: voice cloning through the SoundStorm decoder); ``prompt_max_seconds`` caps it.
        card_dir: a directory holding this plugin's own codec cards (plugins outside the package).
    """

    name: ClassVar[str]
    start: ClassVar[str]
    end: ClassVar[str]
    prefix: ClassVar[str]
    default_codec: ClassVar[str]
    founding: ClassVar[bool] = False
    text_kind: ClassVar[str] = "caption"
    nouns: ClassVar[tuple[str, ...]] = ()
    x2text_openers: ClassVar[tuple[str, ...]] = ("Describe {the} {noun}.",)
    text2x_openers: ClassVar[tuple[str, ...]] = ("Generate {a} {noun} from this description.",)
    sampling: ClassVar[dict[str, Any]] = {}
    max_input_seconds: ClassVar[float | None] = None
    suffixes: ClassVar[tuple[str, ...]] = ()
    output_suffix: ClassVar[str] = ".npy"
    render_options: ClassVar[dict[str, tuple[type, str]]] = {}
    acoustic_prompt: ClassVar[bool] = False
    prompt_max_seconds: ClassVar[float | None] = None
    card_dir: ClassVar[str | os.PathLike | None] = None

    # ------------------------------------------------------------------ media files
    def read(self, src: Source, codec: Any, options: ReadOptions = ReadOptions()) -> tuple[Any, dict[str, Any]]:
        """A file (path or binary stream) -> (codec input, info for the shard's media entry).

        Raises :class:`~anygpt.modalities.media.MediaError` naming the file on unreadable input and
        :class:`MediaRejected` when a filter of ``options`` rejects it.
        """
        raise NotImplementedError(f"modality {self.name!r} does not read files")

    def write(self, path: str | os.PathLike, item: Any, codec: Any) -> Path:
        """Decoded media -> a file at ``path`` (its suffix chosen by the caller, usually ``output_suffix``)."""
        raise NotImplementedError(f"modality {self.name!r} does not write files")

    def describe(self, info: dict[str, Any]) -> str:
        """A few words about what :meth:`read` returned (``3.20 s at 16000 Hz``)."""
        return ", ".join(f"{k} {v}" for k, v in info.items()) or self.name

    def seconds(self, item: Any, codec: Any) -> float | None:
        """Duration of decoded media, when it has one."""
        return None

    def complete_codes(self, lm_codes: np.ndarray, acoustic: Callable[[], Any], prompt: np.ndarray | None,
                       notes: list[str], seed: int | None = None) -> np.ndarray:
        """The LM's codes of a span -> the codes the codec decodes (default: the same).

        ``acoustic()`` returns the modality's acoustic decoder (or None), loaded on first call;
        ``prompt`` is the full codes of a prompt recording when :attr:`acoustic_prompt` is set;
        ``seed`` seeds a sampling decoder (None = fresh).
        """
        return lm_codes

    def __repr__(self) -> str:
        return f"<modality {self.name}>"


class AudioModality(Modality):
    """Audio through ``soundfile`` + ``soxr``: mono, resampled to the codec's rate, clipped, filtered."""

    suffixes = (".wav", ".flac", ".ogg", ".oga", ".mp3", ".aiff", ".aif", ".au", ".opus", ".w64", ".caf", ".sf")
    output_suffix = ".wav"

    def read(self, src: Source, codec: Any, options: ReadOptions = ReadOptions()) -> tuple[Any, dict[str, Any]]:
        import soundfile as sf

        name = media.source_name(src)
        sr = int(codec.sample_rate)
        try:
            with sf.SoundFile(src) as f:
                file_sr, frames = int(f.samplerate), int(f.frames)
        except Exception as e:  # libsndfile raises several types for corrupt data
            raise media.MediaError(f"{name}: cannot read audio ({media.one_line(e)})") from None
        if hasattr(src, "seek"):
            src.seek(0)
        file_seconds = frames / float(file_sr) if file_sr > 0 else 0.0
        start = options.start or 0.0
        end = options.end if options.end is not None else file_seconds
        if start < 0 or end <= start or start >= file_seconds:
            raise MediaRejected("bad_record", f"{name}: segment [{start}, {end}] outside the file's "
                                              f"{file_seconds:.2f} s")
        seconds = min(end, file_seconds) - start
        if options.min_seconds is not None and seconds < options.min_seconds:
            raise MediaRejected("too_short", f"{name}: {seconds:.2f} s < min_seconds {options.min_seconds}")
        if options.max_seconds is not None and seconds > options.max_seconds:
            raise MediaRejected("too_long", f"{name}: {seconds:.2f} s > max_seconds {options.max_seconds}")
        if options.start is None and options.end is None:
            wav, info = media.load_audio(src, sr, max_seconds=options.clip_seconds)
            truncated = info.truncated
        else:  # a segment of a longer file: read only its frames, then the shared mono/resample/clip steps
            try:
                with sf.SoundFile(src) as f:
                    f.seek(int(round(start * file_sr)))
                    data = f.read(int(round(seconds * file_sr)), dtype="float32", always_2d=True)
            except Exception as e:
                raise media.MediaError(f"{name}: cannot read audio ({media.one_line(e)})") from None
            if data.shape[0] == 0 or not np.isfinite(data).all():
                raise media.MediaError(f"{name}: empty or non-finite audio segment")
            wav = media.resample(media.to_mono(data), file_sr, sr)
            wav, truncated = media.clip_audio(wav, sr, options.clip_seconds)
            if wav.shape[0] == 0:
                raise media.MediaError(f"{name}: zero-length audio after resampling")
        info = {"seconds": round(wav.shape[0] / float(sr), 4), "sample_rate": sr, "truncated": bool(truncated),
                "orig_seconds": round(seconds, 4)}
        return np.ascontiguousarray(wav, dtype=np.float32), info

    def write(self, path: str | os.PathLike, item: Any, codec: Any) -> Path:
        return media.save_audio(path, item, int(codec.sample_rate))

    def describe(self, info: dict[str, Any]) -> str:
        text = f"{info['seconds']:.2f}s at {info['sample_rate']} Hz"
        return text + (f" (truncated from {info['orig_seconds']:.2f}s)" if info.get("truncated") else "")

    def seconds(self, item: Any, codec: Any) -> float | None:
        return len(item) / float(codec.sample_rate)


class ImageModality(Modality):
    """Images through Pillow: EXIF orientation applied, RGB, filtered by size and aspect ratio."""

    suffixes = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
    output_suffix = ".png"

    def read(self, src: Source, codec: Any, options: ReadOptions = ReadOptions()) -> tuple[Any, dict[str, Any]]:
        name = media.source_name(src)
        img = media.load_image(src, name=name)
        w, h = img.size
        if options.min_side is not None and min(w, h) < options.min_side:
            raise MediaRejected("image_too_small", f"{name}: {w}x{h} < min_image_side {options.min_side}")
        if options.max_aspect_ratio is not None and max(w, h) / min(w, h) > options.max_aspect_ratio:
            raise MediaRejected("bad_aspect_ratio", f"{name}: aspect {max(w, h) / min(w, h):.2f} > "
                                                    f"{options.max_aspect_ratio}")
        return img, {"width": w, "height": h}

    def write(self, path: str | os.PathLike, item: Any, codec: Any) -> Path:
        if not hasattr(item, "save"):
            from PIL import Image

            item = Image.fromarray(np.asarray(item))
        return media.save_image(path, item)

    def describe(self, info: dict[str, Any]) -> str:
        return f"{info['width']}x{info['height']} image"


__all__ = ["CodecError", "Modality", "AudioModality", "ImageModality", "ReadOptions", "MediaRejected"]
