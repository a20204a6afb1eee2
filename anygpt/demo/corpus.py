"""A synthetic any-to-any corpus with learnable structure, made on the spot in seconds.

Why synthetic: the newcomer's demo must run on a laptop without downloads, and it must *prove* that the
model learned.  Every item here is generated from a few discrete attributes (see
:mod:`anygpt.demo.grammar`), so a caption can be parsed back into attributes and scored exactly, the
chance level of every score is known, and some attribute combinations can be held out of training
entirely to test composition rather than memorisation.

What is made (all under ``out_dir``; media paths in manifests are relative to the manifest):

- images (Pillow, ``image_size`` px, default 224): a big circle / square / triangle in red / green / blue /
  yellow on the left / right / top / bottom of a plain light background, with jitter in size, position,
  rotation, colour and background so no two items are identical.  Caption: ``"a red circle on the left"``.
- speech (real speech from ``espeak-ng``: by default two fixed voices, en-us and en-gb; ``speech_variety``
  ``"high"`` draws from 8 voices x speeds x pitches x levels; trimmed, resampled to 16 kHz mono with soxr,
  16-bit WAV): sentences ``"{number} {colour} {shape}s"`` (``"three blue squares"``), with the sentence as
  transcript.
- music (NumPy synthesis, 32 kHz mono, ``music_seconds`` long, default 1 s): tempo slow (3 notes/s, legato)
  / fast (8 notes/s, staccato) × scale major / minor (melodies over the tonic triad of a fixed tonic, so the
  third -- 4 vs 3 semitones -- is always present) × timbre flute (sine + vibrato, soft attack) / organ
  (band-limited square wave: odd harmonics, sustained) / plucked (all harmonics, sharp attack, fast decay).
  Caption:
  ``"a fast melody in a major key on an organ"``.
- conversations (instruction-tuning data) in the conversation-manifest schema, built only from training
  combinations: spoken request -> chain-of-modality text + image; image + question -> caption; text ->
  music; spoken sentence -> chain-of-modality echo with a spoken answer; music + question -> caption;
  a two-turn dialogue (describe an image, then draw the same shape elsewhere).  Chain-of-modality markers
  are content items ``{"marker": "<-Ins->"}`` / ``{"marker": "<-Res->"}`` (the shard schema's marker item).

The demo's modalities are the registered ones its grammar has content for
(:func:`anygpt.demo.grammar.demo_modalities`); each one's rendering is a ``_Medium`` here, and file
suffixes are the plugins' ``output_suffix``.

Files, per demo modality ``m``: ``train_{m}.jsonl``, ``test_{m}.jsonl`` (rows ``id``, ``text`` and
one media column); ``train_conversations.jsonl``, ``test_conversations.jsonl`` (rows ``id``,
``conversation``), and ``corpus.json`` (grammar, attribute values, held-out combinations and rules, counts,
which test ids are novel).  Test manifests hold *novel* items (every held-out combination, ids
``{m}-test-novel-NNNNN``) followed by *seen* items (fresh renderings of training combinations, ids
``{m}-test-seen-NNNNN``).  Everything is deterministic given the seed (each item has its own RNG seeded by
``(seed, modality, split, index)``; espeak-ng is deterministic for fixed voice/speed/pitch).

``python -m anygpt.demo.corpus OUT_DIR [--quick] [--n N] [--seed S]`` runs :func:`make_corpus`.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from anygpt import modalities as registry
from anygpt.demo.grammar import (
    POSITION_PHRASE,
    all_combinations,
    attribute_values,
    demo_modalities,
    describe,
    grammar,
    grammar_summary,
    held_out_combinations,
    parse_attributes,
    train_combinations,
)

__all__ = [
    "CorpusInfo", "CorpusError", "make_corpus", "render_reference", "parse_attributes", "attribute_values",
    "held_out_combinations", "all_combinations", "describe", "render_image", "render_speech", "render_music",
    "SPEECH_SAMPLE_RATE", "MUSIC_SAMPLE_RATE", "SPEECH_VARIETIES", "FEW_VOICES",
]

SPEECH_SAMPLE_RATE = 16000
MUSIC_SAMPLE_RATE = 32000
DEFAULT_IMAGE_SIZE = 224
DEFAULT_MUSIC_SECONDS = 1.0
DEFAULT_N = 320
QUICK_N = 48

_CONVERSATION_SEED = 4  # the conversations' part of their RNG seeds (see _Medium.seed_index)
_SPLIT_INDEX = {"train": 1, "test_novel": 2, "test_seen": 3, "order": 9}

# espeak-ng voices (language + variant), speeds (words per minute) and pitches (0-99) drawn per item.
VOICES = ("en-us", "en-gb", "en-us+f3", "en-gb+m3", "en-us+f2", "en-gb-scotland", "en-029", "en-us+m7")
SPEED_RANGE = (135, 185)
PITCH_RANGE = (30, 70)
CANONICAL_VOICE = ("en-us", 160, 50)  # voice of references and of the assistant's spoken answers
# "few": fixed (voice, speed, pitch) settings; the first is the canonical voice.
FEW_VOICES = (CANONICAL_VOICE, ("en-gb", 160, 50))
# How much the user-side speech varies (see make_corpus):
#   none -- one voice, one speed, one pitch, one level: every sentence has exactly one rendering;
#   few  -- the FEW_VOICES settings, each fixed: a sentence has len(FEW_VOICES) renderings;
#   high -- a random voice of VOICES, speed in SPEED_RANGE, pitch in PITCH_RANGE, level 0.5-0.9.
SPEECH_VARIETIES = ("none", "few", "high")
DEFAULT_SPEECH_VARIETY = "few"

_RGB = {"red": (215, 40, 40), "green": (40, 165, 60), "blue": (40, 80, 215), "yellow": (235, 205, 40)}
_CENTRE = {"left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73)}

_TONIC_HZ = 261.63  # C4
_SCALE_SEMITONES = {"major": (0, 2, 4, 5, 7, 9, 11, 12), "minor": (0, 2, 3, 5, 7, 8, 10, 12)}
_NOTE_SECONDS = {"slow": 1 / 3, "fast": 1 / 8}
# Fraction of each note that sounds: slow melodies are legato, fast ones staccato.  Why: in a 1 s clip
# the note rate alone hardly moves a bag of codec frames (measured: nearest-reference tempo at chance
# on novel combinations), while the short rests of staccato are in every fast clip, whatever its
# pitch or timbre -- as a listener hears "fast" in any second of it.
_SOUNDING = {"slow": 1.0, "fast": 0.6}
# canonical melodies (scale-degree indices): tonic triad, so the third is always heard
_CANONICAL_MELODY = {"slow": (0, 2, 4), "fast": (0, 2, 4, 7, 4, 2, 0, 2)}


class CorpusError(RuntimeError):
    """Corpus generation failed (e.g. espeak-ng missing); the message says what to do."""


# ------------------------------------------------------------------------------------------ images


def render_image(attrs: Mapping[str, str], rng: np.random.Generator | None = None,
                 size: int = DEFAULT_IMAGE_SIZE) -> "Image.Image":
    """Draw one image; ``rng=None`` gives the canonical (jitter-free) rendering used as a reference."""
    from PIL import Image, ImageDraw

    ss = 2  # supersampling for smooth edges
    big = size * ss

    def u(lo: float, hi: float, canonical: float) -> float:
        return canonical if rng is None else float(rng.uniform(lo, hi))

    grey = u(228, 255, 245)
    tint = [0.0, 0.0, 0.0] if rng is None else rng.uniform(-5, 5, 3).tolist()
    bg = tuple(int(np.clip(grey + t, 0, 255)) for t in tint)
    base = np.array(_RGB[attrs["colour"]], dtype=float)
    fill = base if rng is None else base + rng.uniform(-18, 18, 3)
    fill_t = tuple(int(v) for v in np.clip(fill, 0, 255))
    r = u(0.16, 0.23, 0.20) * big
    cx0, cy0 = _CENTRE[attrs["position"]]
    cx = (cx0 + u(-0.04, 0.04, 0.0)) * big
    cy = (cy0 + u(-0.04, 0.04, 0.0)) * big
    margin = r * 1.16 + 2 * ss
    cx, cy = float(np.clip(cx, margin, big - margin)), float(np.clip(cy, margin, big - margin))
    rot = math.radians(u(-12, 12, 0.0))

    img = Image.new("RGB", (big, big), bg)
    draw = ImageDraw.Draw(img)
    shape = attrs["shape"]
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill_t)
    else:
        if shape == "square":
            angles = [45, 135, 225, 315]
            radius = r * math.sqrt(2) * 0.9  # half-side 0.9 r: similar area to the circle
        else:
            angles = [-90, 30, 150]
            radius = r * 1.16
        pts = [(cx + radius * math.cos(math.radians(a) + rot), cy + radius * math.sin(math.radians(a) + rot))
               for a in angles]
        draw.polygon(pts, fill=fill_t)
    return img.resize((size, size), Image.LANCZOS)


# ------------------------------------------------------------------------------------------ speech


def _espeak(text: str, voice: str, speed: int, pitch: int, tmp_dir: str) -> tuple[np.ndarray, int]:
    import soundfile as sf

    exe = shutil.which("espeak-ng")
    if exe is None:
        raise CorpusError("espeak-ng not found: install it (Debian/Ubuntu: apt-get install espeak-ng)")
    fd, path = tempfile.mkstemp(suffix=".wav", dir=tmp_dir)
    os.close(fd)
    try:
        proc = subprocess.run([exe, "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", path, text],
                              capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise CorpusError(f"espeak-ng failed for voice {voice!r}: {proc.stderr.strip() or proc.returncode}")
        wav, sr = sf.read(path, dtype="float32", always_2d=False)
    finally:
        os.unlink(path)
    if wav.ndim == 2:
        wav = wav.mean(axis=1)
    if wav.size == 0:
        raise CorpusError(f"espeak-ng produced no audio for {text!r} (voice {voice!r})")
    return wav.astype(np.float32), int(sr)


def _trim(wav: np.ndarray, sr: int, rel_threshold: float = 0.02, margin_s: float = 0.05) -> np.ndarray:
    """Cut leading/trailing silence (espeak pads ~0.3 s) -- shorter audio, shorter token spans."""
    env = np.abs(wav)
    loud = np.flatnonzero(env > rel_threshold * float(env.max() or 1.0))
    if loud.size == 0:
        return wav
    m = int(margin_s * sr)
    return wav[max(0, loud[0] - m): min(wav.size, loud[-1] + m + 1)]


def render_speech(text: str, voice: str = CANONICAL_VOICE[0], speed: int = CANONICAL_VOICE[1],
                  pitch: int = CANONICAL_VOICE[2], peak: float = 0.8, tmp_dir: str | None = None) -> np.ndarray:
    """Speak ``text`` with espeak-ng; float32 mono at 16 kHz, silence trimmed, peak-normalised."""
    import soxr

    with tempfile.TemporaryDirectory(dir=tmp_dir) as tmp:
        wav, sr = _espeak(text, voice, speed, pitch, tmp)
    wav = _trim(wav, sr)
    wav = soxr.resample(wav, sr, SPEECH_SAMPLE_RATE, quality="HQ").astype(np.float32)
    return (wav * (peak / max(float(np.abs(wav).max()), 1e-6))).astype(np.float32)


def _speech_params(rng: np.random.Generator, variety: str = "high") -> tuple[str, int, int, float]:
    """(voice, speed, pitch, peak level) of one utterance for a speech variety (``SPEECH_VARIETIES``)."""
    if variety == "none":
        return (*CANONICAL_VOICE, 0.8)
    if variety == "few":
        return (*FEW_VOICES[int(rng.integers(len(FEW_VOICES)))], 0.8)
    if variety != "high":
        raise ValueError(f"speech_variety must be one of {', '.join(SPEECH_VARIETIES)}, got {variety!r}")
    return (VOICES[int(rng.integers(len(VOICES)))], int(rng.integers(SPEED_RANGE[0], SPEED_RANGE[1] + 1)),
            int(rng.integers(PITCH_RANGE[0], PITCH_RANGE[1] + 1)), float(rng.uniform(0.5, 0.9)))


# ------------------------------------------------------------------------------------------- music


def _note(freq: float, n: int, timbre: str, sr: int) -> np.ndarray:
    t = np.arange(n, dtype=np.float64) / sr
    nyq_limit = min(12000.0, 0.45 * sr)
    if timbre == "flute":
        phase = 2 * np.pi * freq * t + 0.006 * freq / 5.0 * np.sin(2 * np.pi * 5.0 * t)  # 5 Hz vibrato
        x = np.sin(phase) + 0.12 * np.sin(2 * phase)
        env = np.minimum(1.0, t / 0.04) * np.minimum(1.0, (t[-1] - t + 1 / sr) / 0.04)
    elif timbre == "organ":
        phase = 2 * np.pi * freq * t
        x = np.zeros(n)
        for k in range(1, int(nyq_limit // freq) + 1, 2):  # band-limited square: odd harmonics 1/k
            x += np.sin(k * phase) / k
        env = np.minimum(1.0, t / 0.008) * np.minimum(1.0, (t[-1] - t + 1 / sr) / 0.015)
    elif timbre == "plucked":
        phase = 2 * np.pi * freq * t
        x = np.zeros(n)
        for k in range(1, min(24, int(nyq_limit // freq)) + 1):  # all harmonics, higher ones die faster
            x += np.exp(-t * (5.0 + 3.0 * k)) * np.sin(k * phase) / k
        env = np.minimum(1.0, t / 0.002) * np.minimum(1.0, (t[-1] - t + 1 / sr) / 0.005)
    else:
        raise ValueError(f"unknown timbre {timbre!r}")
    return x * env


def render_music(attrs: Mapping[str, str], rng: np.random.Generator | None = None,
                 seconds: float = DEFAULT_MUSIC_SECONDS, sr: int = MUSIC_SAMPLE_RATE) -> np.ndarray:
    """Synthesise one clip (float32 mono, exactly ``round(seconds*sr)`` samples); ``rng=None`` = canonical."""
    total = int(round(seconds * sr))
    scale = _SCALE_SEMITONES[attrs["scale"]]
    note_s = _NOTE_SECONDS[attrs["tempo"]] * (1.0 if rng is None else float(rng.uniform(0.92, 1.08)))
    note_n = max(1, int(round(note_s * sr)))
    n_notes = int(math.ceil(total / note_n))
    if rng is None:
        tonic = _TONIC_HZ
        base = list(_CANONICAL_MELODY[attrs["tempo"]])
        degrees = (base * (n_notes // len(base) + 1))[:n_notes]
        peak = 0.8
    else:
        tonic = _TONIC_HZ * 2 ** (float(rng.uniform(-0.3, 0.3)) / 12)  # +-30 cents
        pool = np.array([0, 2, 4, 5, 7])  # tonic, third, fifth, sixth, octave
        probs = np.array([0.25, 0.3, 0.25, 0.1, 0.1])
        degrees = [int(d) for d in rng.choice(pool, size=n_notes, p=probs)]
        need = 1 if attrs["tempo"] == "slow" else 2  # the third decides major vs minor: always present
        if degrees.count(2) < need:
            for pos in rng.choice(n_notes, size=min(need, n_notes), replace=False):
                degrees[int(pos)] = 2
        peak = float(rng.uniform(0.5, 0.9))
    out = np.zeros(n_notes * note_n)
    sound_n = max(1, int(round(note_n * _SOUNDING[attrs["tempo"]])))
    for i, d in enumerate(degrees):
        out[i * note_n:i * note_n + sound_n] = _note(tonic * 2 ** (scale[d] / 12), sound_n, attrs["timbre"], sr)
    out = out[:total]
    return (out * (peak / max(float(np.abs(out).max()), 1e-9))).astype(np.float32)


# ------------------------------------------------------------------------------ media per modality


@dataclass(frozen=True)
class _Style:
    """How media are rendered: sizes, the speech variety, and ``voice`` (a fixed espeak-ng
    ``(voice, speed, pitch)`` for every utterance: references)."""

    image_size: int = DEFAULT_IMAGE_SIZE
    music_seconds: float = DEFAULT_MUSIC_SECONDS
    speech_variety: str = DEFAULT_SPEECH_VARIETY
    voice: tuple[str, int, int] | None = None
    tmp_dir: str | None = None


def _speak(text: str, rng: np.random.Generator | None, style: _Style) -> np.ndarray:
    """``text`` spoken by ``style.voice``, else the canonical voice (``rng=None``), else a voice drawn from
    the style's variety."""
    if style.voice is not None:
        return render_speech(text, *style.voice, tmp_dir=style.tmp_dir)
    if rng is None:
        return render_speech(text, tmp_dir=style.tmp_dir)
    voice, speed, pitch, peak = _speech_params(rng, style.speech_variety)
    return render_speech(text, voice, speed, pitch, peak, tmp_dir=style.tmp_dir)


def _wav_writer(rate: int) -> Callable[[Path, np.ndarray], None]:
    def save(path: Path, wav: np.ndarray) -> None:
        import soundfile as sf

        sf.write(str(path), wav, rate, subtype="PCM_16")  # the container follows the path's suffix
    return save


@dataclass(frozen=True)
class _Medium:
    """How one demo modality's attribute combinations become files: demo content, like its
    :class:`~anygpt.demo.grammar.Grammar`.  The file suffix is the plugin's ``output_suffix``.

    Attributes:
        modality: the registered modality.
        seed_index: the modality's part of every item's RNG seed (fixed: a corpus never changes).
        render: ``(attributes, rng or None for the canonical rendering, style) -> media``.
        save: ``(path, media)`` -> a file (its format follows the path's suffix).
        summary: ``(style, format) ->`` the modality's entry under ``media`` in ``corpus.json``.
    """

    modality: str
    seed_index: int
    render: Callable[[Mapping[str, str], np.random.Generator | None, _Style], Any]
    save: Callable[[Path, Any], None]
    summary: Callable[[_Style, str], dict[str, Any]]


def _speech_summary(style: _Style, fmt: str) -> dict[str, Any]:
    voices: Any = {"voices": list(VOICES), "speed_wpm": list(SPEED_RANGE), "pitch": list(PITCH_RANGE)}
    if style.speech_variety == "none":
        voices = [list(CANONICAL_VOICE)]
    elif style.speech_variety == "few":
        voices = [list(v) for v in FEW_VOICES]
    return {"format": fmt, "sample_rate": SPEECH_SAMPLE_RATE, "channels": 1, "tts": "espeak-ng",
            "variety": style.speech_variety, "voices": voices, "assistant_voice": list(CANONICAL_VOICE)}


_IMAGE = _Medium(
    modality="image", seed_index=1,
    render=lambda attrs, rng, style: render_image(attrs, rng, style.image_size),
    save=lambda path, img: img.save(path),  # Pillow picks the format from the suffix
    summary=lambda style, fmt: {"format": fmt, "size": [style.image_size, style.image_size], "mode": "RGB"},
)
_SPEECH = _Medium(
    modality="speech", seed_index=2,
    render=lambda attrs, rng, style: _speak(describe("speech", attrs), rng, style),
    save=_wav_writer(SPEECH_SAMPLE_RATE),
    summary=_speech_summary,
)
_MUSIC = _Medium(
    modality="music", seed_index=3,
    render=lambda attrs, rng, style: render_music(attrs, rng, style.music_seconds),
    save=_wav_writer(MUSIC_SAMPLE_RATE),
    summary=lambda style, fmt: {"format": fmt, "sample_rate": MUSIC_SAMPLE_RATE, "channels": 1,
                                "seconds": style.music_seconds,
                                "notes_per_second": {k: round(1 / v, 3) for k, v in _NOTE_SECONDS.items()},
                                "sounding_fraction": dict(_SOUNDING), "tonic_hz": _TONIC_HZ},
)
MEDIA: dict[str, _Medium] = {m.modality: m for m in (_IMAGE, _SPEECH, _MUSIC)}


def _medium(modality: str) -> _Medium:
    if modality not in MEDIA:
        raise ValueError(f"the demo corpus renders no {modality!r} media (it renders {', '.join(MEDIA)})")
    return MEDIA[modality]


def _suffix(modality: str) -> str:
    return registry.get(modality).output_suffix


def render_reference(modality: str, text: str, out_path: str | os.PathLike, *, variant: int = 0,
                     image_size: int = DEFAULT_IMAGE_SIZE, music_seconds: float = DEFAULT_MUSIC_SECONDS) -> Path:
    """Render the media a caption / sentence describes (used by the demo's eval to judge text->X answers).

    ``variant=0`` is the canonical rendering (no jitter, canonical voice and melody); ``variant=k>0`` draws
    jitter from a RNG seeded by ``(k, attributes)`` so several references per caption can be made.  Speech:
    ``variant=k < len(FEW_VOICES)`` speaks with the k-th fixed voice of the ``"few"`` variety (exactly
    what the corpus used), larger ``k`` with a random voice/speed/pitch/level of the ``"high"`` variety.
    The text is parsed with :func:`parse_attributes`; a text that does not name every attribute raises
    ``ValueError``.  The file's format follows ``out_path``'s suffix (use the plugin's ``output_suffix``:
    PNG images, 16-bit WAV at 16 kHz for speech and 32 kHz for music); returns the path.
    """
    attrs = parse_attributes(modality, text)
    missing = [a for a in attribute_values(modality) if a not in attrs]
    if missing:
        raise ValueError(f"{modality} text {text!r} does not name: {', '.join(missing)}")
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    rng = None
    if variant:
        key = [ord(c) for c in describe(modality, attrs)][:64]
        rng = np.random.default_rng([int(variant), *key])
    voice = FEW_VOICES[int(variant)] if variant < len(FEW_VOICES) else None
    style = _Style(image_size=image_size, music_seconds=music_seconds, speech_variety="high", voice=voice)
    medium = _medium(modality)
    medium.save(out, medium.render(attrs, rng, style))
    return out


# ------------------------------------------------------------------------------------------ corpus


@dataclass
class CorpusInfo:
    """What :func:`make_corpus` wrote.  ``manifests`` keys: ``train_image``, ``test_speech``,
    ``train_conversations``, ...; ``counts[modality]`` has ``train``, ``test``, ``test_novel``, ``test_seen``."""

    out_dir: Path
    manifests: dict[str, Path]
    counts: dict[str, dict[str, int]]
    held_out: dict[str, list[dict[str, str]]]
    corpus_json: Path
    seed: int
    quick: bool
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)

    def manifest(self, split: str, modality: str) -> Path:
        """``manifest("train", "image")`` -> ``out_dir/train_image.jsonl``."""
        return self.manifests[f"{split}_{modality}"]


def _seed_index(what: str) -> int:
    return _CONVERSATION_SEED if what == "conversation" else _medium(what).seed_index


def _rng(seed: int, modality: str, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), _seed_index(modality), _SPLIT_INDEX[split], int(index)])


def _balanced(combos: list[dict[str, str]], n: int, seed: int, modality: str, split: str) -> list[dict[str, str]]:
    """``n`` combinations cycling through all of them, each cycle in a seeded random order."""
    out: list[dict[str, str]] = []
    r = 0
    while len(out) < n and combos:
        order = np.random.default_rng([int(seed), _seed_index(modality), _SPLIT_INDEX["order"],
                                       _SPLIT_INDEX[split], r]).permutation(len(combos))
        out += [combos[int(i)] for i in order]
        r += 1
    return out[:n]


def _write_jsonl(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


class _Writer:
    """Renders media files under ``out_dir`` and returns their manifest-relative paths."""

    def __init__(self, out_dir: Path, style: _Style):
        self.out_dir, self.style = out_dir, style

    def _path(self, rel: str) -> Path:
        path = self.out_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def media(self, modality: str, stem: str, attrs: Mapping[str, str], rng: np.random.Generator | None) -> str:
        """One attribute combination rendered to ``stem`` + the plugin's output suffix."""
        rel = stem + _suffix(modality)
        medium = _medium(modality)
        medium.save(self._path(rel), medium.render(attrs, rng, self.style))
        return rel

    def speak(self, stem: str, text: str, rng: np.random.Generator | None) -> str:
        """Any ``text`` spoken (conversation turns); ``rng=None``: the canonical (assistant's) voice."""
        rel = stem + _suffix("speech")
        _medium("speech").save(self._path(rel), _speak(text, rng, self.style))
        return rel


CONVERSATION_KINDS = ("speech_to_image", "image_question", "text_to_music", "speech_echo", "music_question",
                      "image_two_turns")
_IMAGE_QUESTIONS = ("what is in this picture?", "describe the image.", "what do you see?")
_MUSIC_QUESTIONS = ("describe this music.", "what kind of melody is this?")
_MUSIC_REQUESTS = ("play {c}", "compose {c}")


def _conversation(kind: str, idx: int, split: str, w: _Writer, rng: np.random.Generator,
                  pick: dict[str, list[dict[str, str]]]) -> dict[str, Any]:
    """One conversation of ``kind``; media combinations drawn from ``pick[modality]``."""
    base = f"conversations/{split}/{kind}-{idx:05d}"

    def choose(modality: str) -> dict[str, str]:
        combos = pick[modality]
        return combos[int(rng.integers(len(combos)))]

    def q(pool: Sequence[str]) -> str:
        return pool[int(rng.integers(len(pool)))]

    ins, res = {"marker": "<-Ins->"}, {"marker": "<-Res->"}
    if kind == "speech_to_image":
        a = choose("image")
        cap = describe("image", a)
        request = f"draw {cap}"
        turns = [("user", [{"speech": w.speak(f"{base}-user", request, rng)}]),
                 ("assistant", [ins, {"text": request}, res, {"text": f"here is {cap}"},
                                {"image": w.media("image", f"{base}-answer", a, rng)}])]
    elif kind == "image_question":
        a = choose("image")
        turns = [("user", [{"image": w.media("image", f"{base}-user", a, rng)}, {"text": q(_IMAGE_QUESTIONS)}]),
                 ("assistant", [{"text": describe("image", a)}])]
    elif kind == "text_to_music":
        a = choose("music")
        cap = describe("music", a)
        turns = [("user", [{"text": q(_MUSIC_REQUESTS).format(c=cap)}]),
                 ("assistant", [{"text": f"here is {cap}"}, {"music": w.media("music", f"{base}-answer", a, rng)}])]
    elif kind == "speech_echo":
        a = choose("speech")
        sentence = describe("speech", a)
        reply = f"you said {sentence}"
        turns = [("user", [{"speech": w.speak(f"{base}-user", sentence, rng)}]),
                 ("assistant", [ins, {"text": sentence}, res, {"text": reply},
                                {"speech": w.speak(f"{base}-answer", reply, None)}])]
    elif kind == "music_question":
        a = choose("music")
        turns = [("user", [{"music": w.media("music", f"{base}-user", a, rng)}, {"text": q(_MUSIC_QUESTIONS)}]),
                 ("assistant", [{"text": describe("music", a)}])]
    elif kind == "image_two_turns":
        b = choose("image")  # what the assistant draws (a held-out combination in test dialogues)
        firsts = [c for c in train_combinations("image") if c["shape"] == b["shape"] and c["colour"] == b["colour"]
                  and c["position"] != b["position"]]
        a = firsts[int(rng.integers(len(firsts)))]  # what the user shows: always a training combination
        where = POSITION_PHRASE[b["position"]]
        turns = [("user", [{"image": w.media("image", f"{base}-user", a, rng)}, {"text": q(_IMAGE_QUESTIONS)}]),
                 ("assistant", [{"text": describe("image", a)}]),
                 ("user", [{"text": f"now draw it {where}"}]),
                 ("assistant", [{"text": f"here is {describe('image', b)}"},
                                {"image": w.media("image", f"{base}-answer", b, rng)}])]
    else:
        raise ValueError(f"unknown conversation kind {kind!r}")
    return {"id": f"conv-{split}-{idx:05d}", "conversation": [{"role": r, "content": c} for r, c in turns]}


def make_corpus(out_dir: str | os.PathLike, n_per_modality: int | None = None, seed: int = 0,
                quick: bool = False, *, n_test: int | None = None, n_conversations: int | None = None,
                image_size: int = DEFAULT_IMAGE_SIZE, music_seconds: float = DEFAULT_MUSIC_SECONDS,
                speech_variety: str = DEFAULT_SPEECH_VARIETY, progress: bool = True,
                workers: int | None = None) -> CorpusInfo:
    """Write the synthetic corpus to ``out_dir`` and return what was written.

    ``n_per_modality`` training items per modality (default 320, or 48 with ``quick=True``);
    ``n_test`` test items per modality (default ``max(2·held-out, n_per_modality // 4)``): first every
    held-out combination in turn (about two thirds, at least one each), then fresh renderings of training
    combinations; ``n_conversations`` training conversations (default ``n_per_modality // 3``, 12 quick),
    cycling through :data:`CONVERSATION_KINDS`, plus a quarter as many test conversations built from
    held-out combinations.  Deterministic given ``seed``.  Progress bars go to stderr (``progress``).

    ``speech_variety`` (``"none"``, ``"few"`` = default, ``"high"``; see :data:`SPEECH_VARIETIES`) sets how
    much user-side speech varies.  Why not more by default: the *tiny* speech codec the demo fits is a
    random-initialised encoder with k-means codebooks, and its codes are not invariant to voice, speed or
    even a 3-unit pitch change (measured: a nearest-reference judge drops from 1.0 to chance), so with
    ``"high"`` a tiny model cannot learn speech in minutes.  ``"few"`` keeps two fixed voices; real codecs
    (SpeechTokenizer) are meant for ``"high"``.
    Items are rendered by ``workers`` threads (default ``min(4, cpu_count)``): espeak-ng runs as a
    subprocess and NumPy/Pillow/soxr release the GIL, while every item has its own RNG and file, so the
    output does not depend on the thread count.
    """
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    if shutil.which("espeak-ng") is None:
        raise CorpusError("espeak-ng not found: install it (Debian/Ubuntu: apt-get install espeak-ng)")
    n = int(n_per_modality if n_per_modality is not None else (QUICK_N if quick else DEFAULT_N))
    if n < 1:
        raise ValueError(f"n_per_modality must be >= 1, got {n}")
    if speech_variety not in SPEECH_VARIETIES:
        raise ValueError(f"speech_variety must be one of {', '.join(SPEECH_VARIETIES)}, got {speech_variety!r}")
    n_conv = int(n_conversations if n_conversations is not None else (12 if quick else max(12, n // 3)))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifests: dict[str, Path] = {}
    counts: dict[str, dict[str, int]] = {}
    timings: dict[str, float] = {}
    novel_ids: dict[str, list[str]] = {}

    modalities = demo_modalities()
    n_workers = max(1, int(workers if workers is not None else min(4, os.cpu_count() or 1)))
    with tempfile.TemporaryDirectory(prefix="anygpt-corpus-") as tmp, \
            ThreadPoolExecutor(max_workers=n_workers) as pool:
        style = _Style(image_size=image_size, music_seconds=music_seconds, speech_variety=speech_variety,
                       tmp_dir=tmp)
        w = _Writer(out, style)
        for modality in modalities:
            t0 = time.perf_counter()
            held, seen = held_out_combinations(modality), train_combinations(modality)
            nt = int(n_test if n_test is not None else max(2 * len(held), n // 4))
            n_novel = min(nt, max(len(held), int(round(nt * 2 / 3))))
            plan = ([("train", i, c) for i, c in enumerate(_balanced(seen, n, seed, modality, "train"))]
                    + [("test_novel", i, c) for i, c in enumerate(_balanced(held, n_novel, seed, modality,
                                                                              "test_novel"))]
                    + [("test_seen", i, c) for i, c in enumerate(_balanced(seen, nt - n_novel, seed, modality,
                                                                             "test_seen"))])
            rows: dict[str, list[dict[str, Any]]] = {"train": [], "test": []}

            def make_item(item: tuple[str, int, dict[str, str]], modality: str = modality) -> tuple[str, dict]:
                split, i, combo = item
                name = f"{modality}-{split.replace('_', '-')}-{i:05d}"
                rel = w.media(modality, f"{modality}/{split.split('_')[0]}/{name}", combo,
                              _rng(seed, modality, split, i))
                return split, {"id": name, "text": describe(modality, combo), modality: rel}

            for split, row in tqdm(pool.map(make_item, plan), total=len(plan), desc=f"corpus {modality}",
                                   disable=not progress, leave=False):
                rows["train" if split == "train" else "test"].append(row)
            for split, rs in rows.items():
                path = out / f"{split}_{modality}.jsonl"
                _write_jsonl(path, rs)
                manifests[f"{split}_{modality}"] = path
            novel_ids[modality] = [r["id"] for r in rows["test"] if "-test-novel-" in r["id"]]
            counts[modality] = {"train": len(rows["train"]), "test": len(rows["test"]),
                                "test_novel": n_novel, "test_seen": nt - n_novel}
            timings[modality] = time.perf_counter() - t0

        t0 = time.perf_counter()
        train_pick = {m: train_combinations(m) for m in modalities}
        test_pick = {m: held_out_combinations(m) for m in modalities}
        n_conv_test = max(len(CONVERSATION_KINDS), n_conv // 4) if n_conv else 0
        conv_plan = ([("train", i) for i in range(n_conv)] + [("test", i) for i in range(n_conv_test)])
        conv_rows: dict[str, list[dict[str, Any]]] = {"train": [], "test": []}

        def make_conv(item: tuple[str, int]) -> tuple[str, dict]:
            split, i = item
            kind = CONVERSATION_KINDS[i % len(CONVERSATION_KINDS)]
            rng = _rng(seed, "conversation", "train" if split == "train" else "test_novel", i)
            return split, _conversation(kind, i, split, w, rng, train_pick if split == "train" else test_pick)

        for split, row in tqdm(pool.map(make_conv, conv_plan), total=len(conv_plan), desc="corpus conversations",
                               disable=not progress, leave=False):
            conv_rows[split].append(row)
        for split, rs in conv_rows.items():
            path = out / f"{split}_conversations.jsonl"
            _write_jsonl(path, rs)
            manifests[f"{split}_conversations"] = path
        counts["conversations"] = {"train": len(conv_rows["train"]), "test": len(conv_rows["test"])}
        timings["conversations"] = time.perf_counter() - t0

    held_out = {m: held_out_combinations(m) for m in modalities}
    summary = {
        "version": 1,
        "seed": int(seed),
        "quick": bool(quick),
        "grammar": grammar_summary(),
        "held_out_rules": {
            **{m: grammar(m).held_out_rule for m in modalities},
            "note": "every single attribute value and every pair of values still occurs in training",
        },
        "held_out": held_out,
        "media": {m: _medium(m).summary(style, _suffix(m).lstrip(".")) for m in modalities},
        "counts": counts,
        "manifests": {k: v.name for k, v in manifests.items()},
        "test_novel_ids": novel_ids,
        "conversation_kinds": list(CONVERSATION_KINDS),
    }
    corpus_json = out / "corpus.json"
    corpus_json.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return CorpusInfo(out_dir=out, manifests=manifests, counts=counts, held_out=held_out, corpus_json=corpus_json,
                      seed=int(seed), quick=bool(quick), seconds=time.perf_counter() - t_start, timings=timings)


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m anygpt.demo.corpus", description=__doc__.split("\n")[0])
    p.add_argument("out_dir")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--n", type=int, default=None, help="training items per modality")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--speech-variety", choices=SPEECH_VARIETIES, default=DEFAULT_SPEECH_VARIETY)
    args = p.parse_args(argv)
    info = make_corpus(args.out_dir, n_per_modality=args.n, seed=args.seed, quick=args.quick,
                       speech_variety=args.speech_variety)
    print(f"corpus written to {info.out_dir} in {info.seconds:.1f} s: "
          + ", ".join(f"{m} {c['train']}+{c['test']}" for m, c in info.counts.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
