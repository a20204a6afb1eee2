"""Files in and out of a conversation: media files -> code spans, generated spans -> .wav / .png.

Inputs go through the codecs (``anygpt.modalities``): audio is read with soundfile and resampled,
clipped to a per-modality limit (a 3-minute song would not fit any context: 200 music ids per second),
and encoded; images are encoded to 32 SEED codes.  Outputs are rendered back:

- speech: the LM's layer-1 ids -> SoundStorm fills RVQ layers 2-8 (continuing a voice prompt's
  8-layer codes when one is given) -> SpeechTokenizer decoder -> 16 kHz wav;
- image: SEED codes -> unCLIP image embedding -> Stable unCLIP pipeline -> png;
- music: frame-major codes -> Encodec 32 kHz decoder -> wav.

Codecs and the SoundStorm decoder are loaded on first use, so a text-only chat never pays for them.
Where they come from: ``--codecs DIR`` (one subdirectory per modality) or ``tiny`` (random codecs for
tests and demos), defaulting to ``MODEL/codecs``; ``--soundstorm DIR|FILE.pt|tiny|none``, defaulting
to ``MODEL/soundstorm`` then ``CODECS/soundstorm``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from anygpt.formats import Media
from anygpt.layout import VocabLayout

# Longest input per modality, in seconds.  Speech: 30 s = 1500 ids (AnyGPT's speech budget);
# music: 10 s = 2000 ids; a voice prompt only needs a few seconds of the target voice.
DEFAULT_MAX_SECONDS = {"speech": 30.0, "music": 10.0, "voice": 10.0}

_AUDIO_EXT = {".wav", ".flac", ".ogg", ".oga", ".mp3", ".aiff", ".aif", ".au", ".opus", ".w64", ".caf", ".sf"}
_IMAGE_EXT = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


class MediaInputError(ValueError):
    """A file given to the model cannot be used (the message names the file and what to do)."""


def _as_source(value: str | Path | None) -> str | Path | None:
    if value is None:
        return None
    if str(value) in ("tiny", "none"):
        return str(value)
    return Path(value)


def resolve_codecs(arg: str | None, model_dir: Path | None) -> str | Path | None:
    """``--codecs``: a directory, ``tiny``, or default ``MODEL/codecs`` when present (else None)."""
    if arg:
        src = _as_source(arg)
        if isinstance(src, Path) and not src.is_dir():
            raise MediaInputError(f"--codecs {arg}: no such directory (expected speech/ music/ image/ inside)")
        return None if src == "none" else src
    if model_dir is not None and (model_dir / "codecs").is_dir():
        return model_dir / "codecs"
    return None


def resolve_soundstorm(arg: str | None, model_dir: Path | None, codecs: str | Path | None) -> str | Path | None:
    """``--soundstorm``: a directory / release ``.pt`` / ``tiny`` / ``none``; default ``MODEL/soundstorm``,
    then ``CODECS/soundstorm``; ``tiny`` codecs imply a tiny decoder."""
    if arg:
        src = _as_source(arg)
        if isinstance(src, Path) and not src.exists():
            raise MediaInputError(f"--soundstorm {arg}: no such directory or file")
        return None if src == "none" else src
    for cand in ([model_dir / "soundstorm"] if model_dir is not None else []) + (
            [codecs / "soundstorm"] if isinstance(codecs, Path) else []):
        if cand.exists():
            return cand
    return "tiny" if codecs == "tiny" else None


def unique_path(directory: Path, stem: str, suffix: str) -> Path:
    """``directory/stem.suffix``, or ``stem-2.suffix``... when taken (outputs never overwrite)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{stem}{suffix}"
    n = 2
    while path.exists():
        path = directory / f"{stem}-{n}{suffix}"
        n += 1
    return path


def slug(text: str, limit: int = 40) -> str:
    """A file-name-safe short form of ``text`` (for output names that say what they are)."""
    s = re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()
    return s[:limit].rstrip("-") or "out"


@dataclass
class Rendered:
    """A generated media part written to a file."""

    modality: str
    path: Path
    seconds: float | None = None
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        extra = f" ({self.seconds:.1f} s)" if self.seconds is not None else ""
        return f"{self.modality}: {self.path}{extra}"


class MediaIO:
    """Encodes input files and renders generated spans, with lazily loaded codecs and decoders.

    Args:
        layout: the vocabulary layout (how many codebooks the LM sees per modality).
        codecs: codecs directory, ``"tiny"``, or None (media unavailable: a clear error on use).
        soundstorm: SoundStorm directory / release ``.pt`` / ``"tiny"`` / None (speech is then
            rendered from the semantic layer alone, with a notice).
        device: where codecs and decoders run.
        max_seconds: per-kind input limits (``speech``, ``music``, ``voice``); longer audio is cut
            to the limit with a notice.
        image_options: ``steps`` / ``guidance`` / ``seed`` for the unCLIP renderer (None = its defaults).
        speech_seed: SoundStorm sampling seed (None = fresh).
        notice: called with one-line notices (once per kind of event).
    """

    def __init__(self, layout: VocabLayout, codecs: str | Path | None, soundstorm: str | Path | None = None,
                 device: torch.device | str = "cpu", max_seconds: dict[str, float] | None = None,
                 image_options: dict[str, Any] | None = None, speech_seed: int | None = None,
                 notice: Callable[[str], None] | None = None) -> None:
        self.layout = layout
        self.codecs_source = codecs
        self.soundstorm_source = soundstorm
        self.device = torch.device(device)
        self.max_seconds = {**DEFAULT_MAX_SECONDS, **(max_seconds or {})}
        self.image_options = {k: v for k, v in (image_options or {}).items() if v is not None}
        self.speech_seed = speech_seed
        self.notice = notice or (lambda msg: None)
        self._codecs: dict[str, Any] = {}
        self._soundstorm: Any = None
        self._soundstorm_loaded = False
        self._told: set[str] = set()

    def _tell_once(self, key: str, msg: str) -> None:
        if key not in self._told:
            self._told.add(key)
            self.notice(msg)

    # ------------------------------------------------------------------ loading
    def codec(self, modality: str) -> Any:
        """The codec for ``modality``, loaded on first use."""
        if modality in self._codecs:
            return self._codecs[modality]
        from anygpt.modalities import build_codec

        src = self.codecs_source
        if src is None:
            raise MediaInputError(f"no {modality} codec: pass --codecs DIR (with {modality}/ inside) or --codecs tiny")
        if src == "tiny":
            codec = build_codec(modality, "tiny")
        else:
            sub = Path(src) / modality
            if not sub.is_dir():
                raise MediaInputError(f"{src}: no '{modality}/' codec directory")
            codec = build_codec(modality, sub)
        codec = codec.to(self.device).eval()
        self._codecs[modality] = codec
        return codec

    def soundstorm(self) -> Any:
        """The SoundStorm decoder (None when there is none; speech then uses layer 1 only)."""
        if self._soundstorm_loaded:
            return self._soundstorm
        from anygpt.decoders.soundstorm import SoundStorm, SoundStormConfig

        src = self.soundstorm_source
        model = None
        if src == "tiny":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model = SoundStorm(SoundStormConfig.tiny())
        elif isinstance(src, Path):
            if src.is_dir():
                model = SoundStorm.from_pretrained(src)
            else:  # AnyGPT's released speechtokenizer_soundstorm_mls.pt
                model = SoundStorm.load_anygpt_release(src)
        if model is not None:
            model = model.to(self.device).eval()
        self._soundstorm, self._soundstorm_loaded = model, True
        return model

    # ------------------------------------------------------------------ inputs
    def _check_kind(self, path: Path, modality: str) -> None:
        """Refuse a file whose extension plainly belongs to another kind of media."""
        if not path.exists():
            raise MediaInputError(f"{path}: no such file")
        if path.is_dir():
            raise MediaInputError(f"{path}: is a directory, not {'an image' if modality == 'image' else 'a ' + modality} file")
        ext = path.suffix.lower()
        if modality == "image" and ext in _AUDIO_EXT:
            raise MediaInputError(f"{path}: unsupported format for an image ({ext} is audio; use /speech or /music)")
        if modality != "image" and ext in _IMAGE_EXT:
            raise MediaInputError(f"{path}: unsupported format for {modality} ({ext} is an image; use /image)")

    def load_audio(self, path: Path, kind: str, sample_rate: int) -> tuple[np.ndarray, list[str]]:
        """Read, down-mix, resample; cut to the ``kind`` limit with a note when longer."""
        from anygpt.modalities.media import load_audio

        limit = self.max_seconds.get(kind)
        wav, info = load_audio(path, sample_rate, max_seconds=limit)
        notes = []
        if info.truncated:
            notes.append(f"{path}: {info.orig_seconds:.1f} s is longer than the {limit:g} s limit for {kind}; "
                         f"using the first {limit:g} s")
        return wav, notes

    def encode_file(self, modality: str, path: str | Path) -> tuple[Media, list[str]]:
        """A media file -> a :class:`Media` part (all of the codec's codebooks) plus notes.

        Raises ``MediaInputError`` / ``MediaError`` / ``CodecError`` (all ``ValueError``) with one-line
        messages naming the file.
        """
        path = Path(path).expanduser()
        if modality not in self.layout.modalities:
            raise MediaInputError(f"this model has no {modality} modality (layout: {sorted(self.layout.modalities)})")
        self._check_kind(path, modality)
        codec = self.codec(modality)
        notes: list[str] = []
        if modality == "image":
            from anygpt.modalities.media import load_image

            codes = codec.encode([load_image(path)])[0]
        else:
            wav, notes = self.load_audio(path, modality, int(codec.sample_rate))
            codes = codec.encode([wav])[0]
        return Media(modality, np.asarray(codes, dtype=np.int64)), notes

    def voice_prompt(self, path: str | Path) -> tuple[np.ndarray, list[str]]:
        """A recording of the voice to answer in -> its full 8-layer speech codes ``[8, Tp]``."""
        path = Path(path).expanduser()
        self._check_kind(path, "speech")
        codec = self.codec("speech")
        wav, notes = self.load_audio(path, "voice", int(codec.sample_rate))
        codes = np.asarray(codec.encode([wav])[0], dtype=np.int64)
        if self.soundstorm_source is None:
            notes.append("no SoundStorm decoder (--soundstorm DIR): the voice prompt cannot be used for rendering")
        return codes, notes

    # ------------------------------------------------------------------ outputs
    def render(self, media: Media, directory: Path, stem: str, voice: np.ndarray | None = None) -> Rendered:
        """Decode one generated span and write it under ``directory`` (never overwriting)."""
        from anygpt.modalities.media import save_audio, save_image

        m = media.modality
        codes = np.asarray(media.codes, dtype=np.int64)
        codec = self.codec(m)
        notes: list[str] = []
        if m == "image":
            img = codec.decode([codes], **self.image_options)[0]
            if not hasattr(img, "save"):
                from PIL import Image

                img = Image.fromarray(np.asarray(img))
            path = save_image(unique_path(directory, stem, ".png"), img)
            return Rendered(m, path, None, notes)
        if m == "speech":
            full = self.speech_codes(codes[0], voice, notes)
            wav = codec.decode([full])[0]
        else:
            wav = codec.decode([codes])[0]
        sr = int(codec.sample_rate)
        path = save_audio(unique_path(directory, stem, ".wav"), wav, sr)
        return Rendered(m, path, len(wav) / sr, notes)

    def speech_codes(self, semantic: np.ndarray, voice: np.ndarray | None, notes: list[str]) -> np.ndarray:
        """Layer-1 ids ``[T]`` -> ``[8, T]`` through SoundStorm (or ``[1, T]`` when there is none)."""
        ss = self.soundstorm()
        if ss is None:
            self._tell_once("no-soundstorm", "no SoundStorm decoder (--soundstorm DIR): speech is rendered from "
                                             "the semantic layer only (expect muffled audio)")
            return semantic[None]
        prompt = None
        if voice is not None:
            n_q = ss.config.num_quantizers
            if voice.shape[0] < n_q:
                notes.append(f"voice prompt has {voice.shape[0]} layers, SoundStorm needs {n_q}: ignored")
            else:
                prompt = torch.as_tensor(voice[:n_q])
        out = ss.generate(torch.as_tensor(semantic)[None], prompt=prompt, seed=self.speech_seed)
        return out[0].cpu().numpy().astype(np.int64)
