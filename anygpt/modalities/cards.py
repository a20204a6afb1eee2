"""Codec cards: the YAML files in ``tokenizers/`` that describe each codec, one card per codec.

A card says which modality the codec serves, which class implements it (``implementation:
module:Class``), which files a checkpoint directory must hold, the sample/frame rates and codebooks the
rest of the system relies on (``lm_codebooks``: how many of them the LM sees; ``tokens_per_item``: a
fixed span length), where users download the public checkpoint themselves, and its license.  Codecs
are built from (card, checkpoint dir) or (card, ``tiny``); ``Codec.save`` copies the card into the
directory it writes (``card.yaml``), so a saved or fitted codec directory is self-describing and an
exported model can carry it.

Where a card is looked for:
  1. ``<checkpoint dir>/card.yaml`` (written by ``save``/``anygpt codec fit``);
  2. by codec name, ``<name>.yaml`` in ``$ANYGPT_TOKENIZERS_DIR``, in a plugin's own ``card_dir``, then
     in the shipped cards (the repository's ``tokenizers/``, package data of an installed wheel).

A raw official download has no ``card.yaml``.  A card may say how to recognise one
(``detect: {config.json: {model_type: mimi}}``: each named JSON file exists and holds those values),
so a codecs directory can hold any of a modality's codecs as downloaded (:func:`card_detects`).
"""
from __future__ import annotations

import fnmatch
import json
import logging
import os
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

if TYPE_CHECKING:  # torch is imported by the codecs, not by the card logic (the CLI reads cards)
    import torch

import yaml

from anygpt.modalities.plugin import CodecError

log = logging.getLogger(__name__)

CARD_FILE = "card.yaml"
CARD_VERSION = 1
CARDS_ENV = "ANYGPT_TOKENIZERS_DIR"

# Fields every card must define (``sample_rate``/``frame_rate`` may be null for images).
REQUIRED_FIELDS = ("name", "modality", "implementation", "sample_rate", "frame_rate", "num_codebooks",
                   "codebook_size", "lm_codebooks", "files")


def card_dirs(extra: Iterable[str | os.PathLike] = ()) -> list[Path]:
    """Directories holding named cards, first hit wins: ``$ANYGPT_TOKENIZERS_DIR``, ``extra``, shipped."""
    from anygpt.resources import shipped_dir

    env = os.environ.get(CARDS_ENV)
    dirs = [Path(env)] if env else []
    dirs += [Path(d) for d in extra]
    dirs.append(shipped_dir("cards"))
    return [d for d in dirs if d.is_dir()]


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
    if not 1 <= int(card["lm_codebooks"]) <= int(card["num_codebooks"]):
        raise CodecError(f"card {where}: lm_codebooks must be between 1 and num_codebooks ({card['num_codebooks']})")
    detect = card.get("detect")
    if detect is not None and not (isinstance(detect, dict) and detect
                                   and all(isinstance(v, dict) and v for v in detect.values())):
        raise CodecError(f"card {where}: 'detect' must map a JSON file name to the values it must hold, "
                         f"e.g. {{config.json: {{model_type: mimi}}}}")
    return card


def named_card(name: str, extra_dirs: Iterable[str | os.PathLike] = ()) -> dict[str, Any]:
    """The card of codec ``name`` (``speechtokenizer``, ``mimi`` ...) from the card directories."""
    dirs = card_dirs(extra_dirs)
    for d in dirs:
        path = d / f"{name}.yaml"
        if path.is_file():
            card = _read_yaml(path)
            card["_path"] = str(path)
            return validate_card(card)
    known = sorted({p.stem for d in dirs for p in d.glob("*.yaml")})
    raise CodecError(f"no card for codec {name!r} (looked in {[str(d) for d in dirs]}; known: {known})")


def all_cards(extra_dirs: Iterable[str | os.PathLike] = ()) -> list[dict[str, Any]]:
    """Every named card (first hit per name wins), sorted by name; unreadable files are skipped."""
    seen: dict[str, dict[str, Any]] = {}
    for d in card_dirs(extra_dirs):
        for path in sorted(d.glob("*.yaml")):
            if path.stem in seen:
                continue
            try:
                card = validate_card({**_read_yaml(path), "_path": str(path)})
            except CodecError as e:
                log.warning("skipping card %s", e)
                continue
            seen[path.stem] = card
    return [seen[k] for k in sorted(seen)]


def dir_card(directory: str | os.PathLike) -> dict[str, Any] | None:
    """``directory/card.yaml`` when the directory has one (a saved or fitted codec), else None."""
    path = Path(directory) / CARD_FILE
    if not path.is_file():
        return None
    card = _read_yaml(path)
    card["_path"] = str(path)
    return validate_card(card)


def card_detects(card: dict[str, Any], directory: str | os.PathLike) -> bool:
    """Whether ``directory`` (a checkpoint without ``card.yaml``) matches the card's ``detect`` rule:
    every named JSON file exists and holds the given top-level values.  No rule: False."""
    for name, want in (card.get("detect") or {}).items():
        try:
            data = json.loads((Path(directory) / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        if not isinstance(data, dict) or any(data.get(k) != v for k, v in want.items()):
            return False
    return bool(card.get("detect"))


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


def keys_by_prefix(keys: list[str], depth: int = 2) -> str:
    """Checkpoint keys summarised for one log line: counts per leading ``depth`` name parts."""
    groups = Counter(".".join(k.split(".")[:depth]) for k in keys)
    return ", ".join(f"{p}.* {n}" for p, n in groups.most_common(8)) + (" ..." if len(groups) > 8 else "")


def report_unused(card: dict[str, Any], path: Path, keys: list[str]) -> None:
    """One warning for checkpoint keys a loader does not use: how many, grouped by prefix."""
    log.warning("%s: %s holds %d keys this codec does not use (ignored): %s", card_label(card), Path(path).name,
                len(keys), keys_by_prefix(keys))


def load_weights(module: torch.nn.Module, sd: dict[str, torch.Tensor], card: dict[str, Any], path: Path,
                 assign: bool = False) -> list[str]:
    """Load ``sd`` into ``module``: every parameter and buffer the module has must be there with its
    shape (else one ``CodecError`` naming the card, the file and the keys); keys the module does not
    use are reported once, grouped by prefix, and ignored.

    Why not strict: released checkpoints carry weights of branches the inference graph does not
    build (SEED's ``seed_quantizer.pt`` holds ~146 such keys; SEED's own loader reports them and goes
    on).  Missing or mis-shaped keys would leave random weights in place, so those stay errors.
    Floating tensors are cast to the module's dtype first (release checkpoints may hold fp16).  With
    ``assign=True`` the loaded tensors replace the module's own, so a model built on the ``meta``
    device (no random init, no memory) becomes a real one.  Returns the unused keys.
    """
    own = module.state_dict()
    missing = [k for k in own if k not in sd]
    unused = [k for k in sd if k not in own]
    shape = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own
             if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys ({keys_by_prefix(missing)}; e.g. {missing[:3]})")
        if shape:
            parts.append(f"{len(shape)} shape mismatches (e.g. {shape[:3]})")
        raise CodecError(f"{card_label(card)}: {path} does not match the architecture: {'; '.join(parts)}")
    if unused:
        report_unused(card, path, unused)
    sd = {k: (v.to(own[k].dtype) if v.is_floating_point() and v.dtype != own[k].dtype else v)
          for k, v in sd.items() if k in own}
    module.load_state_dict(sd, strict=True, assign=assign)
    return unused


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
    "CARDS_ENV",
    "card_dirs",
    "named_card",
    "all_cards",
    "dir_card",
    "card_detects",
    "validate_card",
    "resolve_files",
    "check_codec_matches",
    "write_card",
    "load_weights",
    "report_unused",
    "keys_by_prefix",
    "card_label",
    "expected_files_text",
]
