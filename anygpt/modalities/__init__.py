"""The modality registry: which modalities exist, in which order, and how their codecs are built.

Every modality is a plugin (:class:`~anygpt.modalities.plugin.Modality`), registered in this order:

1. the built-in ones, below (their order *is* the order of the reference vocabulary layout);
2. plugins of installed packages, through the ``anygpt.modalities`` entry-point group;
3. modules or ``.py`` files named in ``$ANYGPT_PLUGINS`` (comma-separated; experiments and tests; a
   file ``x/toy.py`` is imported as module ``anygpt_plugin_toy``, the name its card's
   ``implementation`` uses).

A modality's codecs are its cards (``tokenizers/<codec>.yaml``, or ``card.yaml`` inside a codec
directory): each card names its modality and the class that implements it, so adding a codec is one
module plus one card and nothing here changes.  ``build_codec(modality, "tiny")`` builds the tiny
random codec of the modality's default card; ``build_codec(modality, DIR)`` loads a checkpoint
directory described by its card (``card.yaml``, or for a raw download the card whose ``detect`` rule
matches it: :func:`directory_card`); :func:`load_codecs` turns a codecs directory (one subdirectory per
modality) into codec objects, the one implementation of that everywhere.

Appending a modality never moves an id: the default layout places every later modality after the
ranges of the earlier ones (:meth:`anygpt.layout.VocabLayout.default`).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from anygpt.modalities.cards import all_cards, card_detects, dir_card, named_card
from anygpt.modalities.plugin import CodecError, Modality

if TYPE_CHECKING:
    from anygpt.modalities.base import Codec

BUILTIN = ("anygpt.modalities.image", "anygpt.modalities.speech", "anygpt.modalities.music")
ENTRY_POINT_GROUP = "anygpt.modalities"
PLUGINS_ENV = "ANYGPT_PLUGINS"

_REGISTRY: dict[str, Modality] = {}
_LOADED: list[bool] = []


def register_modality(cls: type[Modality]) -> type[Modality]:
    """Class decorator: add a modality plugin to the registry (once; re-registering the same class is
    a no-op, another class under a taken name an error)."""
    for attr in ("name", "start", "end", "prefix", "default_codec"):
        if not getattr(cls, attr, None):
            raise CodecError(f"modality plugin {cls.__qualname__}: missing class attribute {attr!r}")
    old = _REGISTRY.get(cls.name)
    if old is not None:
        if type(old).__qualname__ == cls.__qualname__ and type(old).__module__ == cls.__module__:
            return cls
        raise CodecError(f"modality {cls.name!r} is registered twice ({type(old).__module__} and {cls.__module__})")
    if cls.founding and any(not p.founding for p in _REGISTRY.values()):
        raise CodecError(f"modality {cls.name!r}: only the built-in modalities may be founding ones")
    _REGISTRY[cls.name] = cls()
    return cls


def _import_plugin(spec: str) -> None:
    """Import a plugin given as a module name or a path to a ``.py`` file."""
    if spec.endswith(".py") or os.sep in spec:
        path = Path(spec).expanduser().resolve()
        name = f"anygpt_plugin_{path.stem}"
        if name in sys.modules:
            return
        loader_spec = importlib.util.spec_from_file_location(name, path)
        if loader_spec is None or loader_spec.loader is None or not path.is_file():
            raise CodecError(f"${PLUGINS_ENV}: {spec}: no such plugin file")
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[name] = module
        loader_spec.loader.exec_module(module)
    else:
        importlib.import_module(spec)


def _ensure_loaded() -> None:
    if _LOADED:
        return
    _LOADED.append(True)
    for name in BUILTIN:
        importlib.import_module(name)
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        ep.load()
    for spec in filter(None, (s.strip() for s in os.environ.get(PLUGINS_ENV, "").split(","))):
        _import_plugin(spec)


def registered() -> dict[str, Modality]:
    """Every registered modality, name -> plugin, in registry order."""
    _ensure_loaded()
    return dict(_REGISTRY)


def names() -> tuple[str, ...]:
    return tuple(registered())


def get(name: str) -> Modality:
    """The plugin of modality ``name``; ``CodecError`` listing the known ones otherwise."""
    plugins = registered()
    if name not in plugins:
        raise CodecError(f"unknown modality {name!r}; known: {', '.join(plugins)}")
    return plugins[name]


# ------------------------------------------------------------------------------------ codecs ---


def _card_dirs(plugin: Modality) -> list[str]:
    card_dir = getattr(plugin, "card_dir", None)
    return [str(card_dir)] if card_dir else []


def codec_card(modality: str, codec: str | None = None) -> dict[str, Any]:
    """The card of ``codec`` (default: the modality's default codec), checked to serve ``modality``."""
    plugin = get(modality)
    card = named_card(codec or plugin.default_codec, _card_dirs(plugin))
    if card["modality"] != modality:
        raise CodecError(f"codec {card['name']!r} ({card['_path']}) is a {card['modality']} codec, not a {modality} one")
    return card


def codec_names(modality: str) -> list[str]:
    """Names of the codecs a modality can use (its cards), the default first."""
    plugin = get(modality)
    found = [c["name"] for c in all_cards(_card_dirs(plugin)) if c["modality"] == modality]
    return sorted(set(found), key=lambda n: (n != plugin.default_codec, n))


def choose_codecs(wanted: Iterable[str]) -> dict[str, str]:
    """Codec names (``--codec mimi``) -> ``{modality: name}``, each name given to the modality whose
    cards include it; ``CodecError`` for an unknown name or two codecs for one modality."""
    chosen: dict[str, str] = {}
    for name in wanted:
        owners = [m for m in names() if name in codec_names(m)]
        if not owners:
            known = sorted({c for m in names() for c in codec_names(m)})
            raise CodecError(f"no registered modality has a codec named {name!r} (known: {', '.join(known)})")
        m = owners[0]
        if chosen.get(m, name) != name:
            raise CodecError(f"{chosen[m]} and {name} are both {m} codecs; give one per modality")
        chosen[m] = name
    return chosen


def codec_class(card: dict[str, Any]) -> "type[Codec]":
    """The class a card names in ``implementation: package.module:ClassName``."""
    impl = str(card.get("implementation", ""))
    module, _, attr = impl.partition(":")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise CodecError(f"card {card.get('_path', card.get('name'))}: implementation {impl!r} cannot be "
                         f"imported ({type(e).__name__}: {e})") from None
    return cls


def directory_card(directory: str | os.PathLike, modality: str, codec: str | None = None) -> dict[str, Any]:
    """The card of the codec in a checkpoint directory, checked to serve ``modality``.

    A ``card.yaml`` (written by ``save``) says which codec the directory holds.  A raw official
    download has none: the first of the modality's cards whose ``detect`` rule matches it
    (``config.json`` with ``model_type: mimi``), else the card of ``codec``, else the default codec.
    ``codec`` given and the directory holding another codec is an error.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return codec_card(modality, codec)  # the codec's from_dir names the missing directory
    card, how = dir_card(directory), ""
    if card is None:
        detected = [c for c in (codec_card(modality, n) for n in codec_names(modality)) if card_detects(c, directory)]
        if not detected:
            return codec_card(modality, codec)
        card, how = detected[0], f" (its files match the {detected[0]['name']} card's detect rule)"
    if card["modality"] != modality:
        raise CodecError(f"{directory}: holds a {card['modality']} codec ({card['name']}), not a {modality} one")
    if codec is not None and card["name"] != codec:
        raise CodecError(f"{directory}: holds codec {card['name']!r}{how}, not {codec!r}")
    return card


def build_codec(modality: str, source: str | os.PathLike = "tiny", codec: str | None = None, **kwargs: Any) -> "Codec":
    """Build ``modality``'s codec from ``"tiny"`` (random, small) or a checkpoint directory.

    Args:
        modality: a registered modality.
        source: ``"tiny"`` or a codec directory (which codec it holds: :func:`directory_card`).
        codec: the card name to use (``mimi``); a directory holding another codec is an error.
    """
    if str(source) == "tiny":
        card = codec_card(modality, codec)
        return codec_class(card).tiny(card=card, **kwargs)
    card = directory_card(source, modality, codec)
    return codec_class(card).from_dir(Path(source), card=card, **kwargs)


def codec_dir(codecs: str | os.PathLike, modality: str) -> Path:
    """The directory of ``modality``'s codec inside a codecs directory (``DIR/<modality>/``), or
    ``DIR`` itself when it is one codec's directory (holds a ``card.yaml`` for that modality, or is
    a raw download one of the modality's cards detects)."""
    root = Path(codecs)
    if (root / modality).is_dir():
        return root / modality
    if root.is_dir():
        card = dir_card(root)
        if card is not None and card["modality"] == modality:
            return root
        if card is None and any(card_detects(codec_card(modality, n), root) for n in codec_names(modality)):
            return root
    raise CodecError(f"{codecs}: no '{modality}/' codec directory (expected one per modality, "
                     f"e.g. from 'anygpt codec fit')")


def codecs_in(codecs: str | os.PathLike) -> list[str]:
    """Registered modalities that a codecs directory has a subdirectory for, in registry order."""
    root = Path(codecs)
    return [m for m in names() if (root / m).is_dir()]


def load_codecs(codecs: str | os.PathLike | None, modalities: Iterable[str] | None = None,
                **kwargs: Any) -> dict[str, "Codec"]:
    """A codecs directory (one subdirectory per modality) or ``"tiny"``/None -> codec objects.

    Args:
        codecs: the directory, or ``"tiny"``/None for the tiny random codecs.
        modalities: which to load (default: every subdirectory the directory has; every registered
            modality for tiny codecs).
    """
    tiny = codecs is None or str(codecs) == "tiny"
    wanted = list(modalities) if modalities is not None else (list(names()) if tiny else codecs_in(codecs))
    if not tiny and not wanted:
        raise CodecError(f"{codecs}: holds no codec directory (expected {', '.join(names())} subdirectories)")
    return {m: build_codec(m, "tiny" if tiny else codec_dir(codecs, m), **kwargs) for m in wanted}


def directory_cards(codecs: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The cards of a codecs directory's codecs (modality -> card), without loading any weights."""
    return {m: directory_card(Path(codecs) / m, m) for m in codecs_in(codecs)}


__all__ = ["Modality", "CodecError", "register_modality", "registered", "names", "get", "codec_card",
           "codec_names", "choose_codecs", "codec_class", "directory_card", "build_codec", "codec_dir", "codecs_in", "load_codecs",
           "directory_cards", "BUILTIN", "PLUGINS_ENV", "ENTRY_POINT_GROUP"]
