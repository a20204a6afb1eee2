"""Codec cards: the YAML files in ``tokenizers/`` that describe each modality codec.

A card says which files a checkpoint directory must hold, the sample/frame rates and codebooks the
rest of the system relies on, where users download the public checkpoint themselves, and its
license.  Codecs are built from (card, checkpoint dir) or (card, ``tiny``); ``Codec.save`` copies
the card into the directory it writes (``card.yaml``), so a saved or fitted codec directory is
self-describing and an exported model can carry it.

Where a card is looked for (first hit wins):
  1. ``<checkpoint dir>/card.yaml`` (written by ``save``/``anygpt codec fit``);
  2. ``$ANYGPT_TOKENIZERS_DIR/<modality>.yaml``;
  3. the repository's ``tokenizers/<modality>.yaml`` (next to the ``anygpt`` package);
  4. a minimal built-in card (expected files and rates only), so a raw official download still
     loads from an installed wheel that does not ship ``tokenizers/``.
"""
from __future__ import annotations

import fnmatch
import os
from pathlib import Path
from typing import Any

import torch
import yaml

from anygpt.modalities.base import CodecError

CARD_FILE = "card.yaml"
CARD_VERSION = 1

# Fields every card must define (``sample_rate``/``frame_rate`` may be null for images).
REQUIRED_FIELDS = ("name", "modality", "sample_rate", "frame_rate", "num_codebooks", "codebook_size", "files")

# Last-resort cards: the facts the code needs when no YAML card can be found.  The YAML cards in
# tokenizers/ are the documented source; tests check that these agree with them.
BUILTIN_CARDS: dict[str, dict[str, Any]] = {
    "speech": {
        "name": "speechtokenizer",
        "modality": "speech",
        "sample_rate": 16000,
        "frame_rate": 50,
        "num_codebooks": 8,
        "codebook_size": 1024,
        "files": {"config": ["config.json"], "weights": ["SpeechTokenizer.pt", "ckpt.dev", "*.pt", "*.pth"]},
    },
    "music": {
        "name": "encodec_32khz",
        "modality": "music",
        "sample_rate": 32000,
        "frame_rate": 50,
        "num_codebooks": 4,
        "codebook_size": 2048,
        "files": {"config": ["config.json"], "weights": ["model.safetensors", "pytorch_model.bin"]},
    },
    "image": {
        "name": "seed_tokenizer_2",
        "modality": "image",
        "sample_rate": None,
        "frame_rate": None,
        "num_codebooks": 1,
        "codebook_size": 8192,
        "tokens_per_image": 32,
        "files": {"weights": ["seed_quantizer.pt"]},
        "optional_files": {"vision": ["eva_vit_g.pth", "eva_vit_g.pt"], "arch": ["seed_config.json"]},
    },
}


def tokenizers_dir() -> Path | None:
    """The directory holding the YAML cards, or ``None`` when neither the env var nor the repo has one."""
    env = os.environ.get("ANYGPT_TOKENIZERS_DIR")
    if env and Path(env).is_dir():
        return Path(env)
    repo = Path(__file__).resolve().parents[2] / "tokenizers"
    return repo if repo.is_dir() else None


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise CodecError(f"card {path}: cannot read ({' '.join(str(exc).split())})") from None
    if not isinstance(data, dict):
        raise CodecError(f"card {path}: expected a YAML mapping, got {type(data).__name__}")
    return data


def validate_card(card: dict[str, Any], modality: str | None = None) -> dict[str, Any]:
    """Check required fields (and the modality) and return the card; ``CodecError`` otherwise."""
    where = card.get("_path", card.get("name", "<card>"))
    missing = [f for f in REQUIRED_FIELDS if f not in card]
    if missing:
        raise CodecError(f"card {where}: missing field(s) {missing}")
    if modality is not None and card["modality"] != modality:
        raise CodecError(f"card {where}: is for modality {card['modality']!r}, not {modality!r}")
    files = card["files"]
    if not isinstance(files, dict) or not all(isinstance(v, list) and v for v in files.values()):
        raise CodecError(f"card {where}: 'files' must map a role to a non-empty list of file names/patterns")
    return card


def load_card(modality: str, directory: str | os.PathLike | None = None) -> dict[str, Any]:
    """The card for ``modality``: ``directory/card.yaml`` first, then the tokenizers dir, then built-in.

    The returned dict carries ``_path`` (where it came from) for error messages.
    """
    candidates: list[Path] = []
    if directory is not None:
        candidates.append(Path(directory) / CARD_FILE)
    tdir = tokenizers_dir()
    if tdir is not None:
        candidates.append(tdir / f"{modality}.yaml")
    for path in candidates:
        if path.is_file():
            card = _read_yaml(path)
            card["_path"] = str(path)
            return validate_card(card, modality)
    if modality not in BUILTIN_CARDS:
        raise CodecError(f"no card for modality {modality!r} (looked in {[str(c) for c in candidates]})")
    card = {k: (dict(v) if isinstance(v, dict) else v) for k, v in BUILTIN_CARDS[modality].items()}
    card["_path"] = f"<built-in {modality} card>"
    return validate_card(card, modality)


def card_label(card: dict[str, Any]) -> str:
    return f"{card.get('name', '?')} card ({card.get('_path', '?')})"


def expected_files_text(card: dict[str, Any]) -> str:
    parts = [f"{role}: {' | '.join(pats)}" for role, pats in card["files"].items()]
    return "; ".join(parts)


def _match(directory: Path, patterns: list[str]) -> Path | None:
    names = sorted(p.name for p in directory.iterdir() if p.is_file())
    for pat in patterns:
        hits = [n for n in names if fnmatch.fnmatch(n, pat)]
        if hits:
            return directory / hits[0]
    return None


def resolve_files(card: dict[str, Any], directory: str | os.PathLike) -> dict[str, Path]:
    """Map each file role of the card to a file in ``directory``.

    Required roles (``files``) must all be present, else ``CodecError`` naming the card, the
    directory and every expected file; ``optional_files`` roles are included when found.
    """
    directory = Path(directory)
    src = card.get("checkpoints") or []
    hint = ""
    if src and isinstance(src[0], dict) and src[0].get("source"):
        hint = f"; download it from {src[0]['source']}"
    if not directory.is_dir():
        raise CodecError(f"{card_label(card)}: checkpoint directory {directory} does not exist "
                         f"(expected {expected_files_text(card)}{hint})")
    out: dict[str, Path] = {}
    missing = []
    for role, patterns in card["files"].items():
        hit = _match(directory, list(patterns))
        if hit is None:
            missing.append(f"{role} ({' | '.join(patterns)})")
        else:
            out[role] = hit
    if missing:
        raise CodecError(f"{card_label(card)}: {directory} lacks {', '.join(missing)}; "
                         f"expected {expected_files_text(card)}{hint}")
    for role, patterns in (card.get("optional_files") or {}).items():
        hit = _match(directory, list(patterns))
        if hit is not None:
            out[role] = hit
    return out


def check_codec_matches(card: dict[str, Any], **actual: Any) -> None:
    """Raise ``CodecError`` when a built codec disagrees with its card (e.g. a config with n_q=4)."""
    bad = []
    for key, value in actual.items():
        if key not in card or card[key] is None and value is None:
            continue
        want = card[key]
        if isinstance(want, (int, float)) and isinstance(value, (int, float)):
            if abs(float(want) - float(value)) > 1e-6:
                bad.append(f"{key}={value} (card says {want})")
        elif want != value:
            bad.append(f"{key}={value} (card says {want})")
    if bad:
        raise CodecError(f"{card_label(card)}: checkpoint does not match the card: {', '.join(bad)}")


def strict_load(module: torch.nn.Module, sd: dict[str, torch.Tensor], card: dict[str, Any], path: Path,
                assign: bool = False) -> None:
    """``load_state_dict(strict=True)`` with a one-line ``CodecError`` naming the card and file.

    Floating tensors are cast to the module's dtype first (release checkpoints may hold fp16).  With
    ``assign=True`` the loaded tensors replace the module's own, so a model built on the ``meta``
    device (no random init, no memory) becomes a real one.
    """
    own = module.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shape = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own
             if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
        if shape:
            parts.append(f"{len(shape)} shape mismatches (e.g. {shape[:2]})")
        raise CodecError(f"{card_label(card)}: {path} does not match the architecture: {'; '.join(parts)}")
    sd = {k: (v.to(own[k].dtype) if v.is_floating_point() and v.dtype != own[k].dtype else v) for k, v in sd.items()}
    module.load_state_dict(sd, strict=True, assign=assign)


def write_card(card: dict[str, Any], directory: str | os.PathLike, **updates: Any) -> Path:
    """Write ``card`` (plus ``updates``) as ``directory/card.yaml``; private ``_`` keys are dropped."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    data = {k: v for k, v in card.items() if not k.startswith("_")}
    data.update(updates)
    data.setdefault("card_version", CARD_VERSION)
    path = directory / CARD_FILE
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


__all__ = [
    "CARD_FILE",
    "BUILTIN_CARDS",
    "tokenizers_dir",
    "load_card",
    "validate_card",
    "resolve_files",
    "check_codec_matches",
    "write_card",
    "strict_load",
    "card_label",
    "expected_files_text",
]
