"""Corpus recipes: one YAML per public corpus naming its reader, fields and filters.

A recipe says how *a local copy* of a corpus is laid out and what to keep; it never downloads.
``anygpt preprocess --recipe laion_coco --input /data/laion-coco-wds --out shards/ --codecs codecs/``
runs it; command-line flags override the recipe's values.  Shipped recipes live in
``data_pipeline/recipes/*.yaml`` (``--recipe NAME``); any other YAML file works too (``--recipe FILE``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import yaml

from anygpt import modalities as registry
from anygpt.config import ConfigError, from_dict
from data_pipeline.options import Fields, Filters, PreprocessError, PreprocessOptions, ReaderOptions, Source, TextOptions

RECIPE_DIR = Path(__file__).with_name("recipes")


@dataclass
class Recipe:
    """Schema of a recipe file (unknown keys are errors).

    Attributes:
        name: short name; also the default ``corpus`` written into every sample and the shard prefix.
        source: the reader (``manifest``, ``librispeech``, ``commonvoice``, ``wds-pairs``,
            ``anygpt-jsonl``, ``conversations``).
        expects: the local layout ``--input`` must point at (documentation, shown by ``--list-recipes``).
        modality: media modality when the reader cannot tell (audio tars, manifest columns); a
            registered one (:mod:`anygpt.modalities`), checked when the recipe is loaded.
        fields / filters / text / reader: see :mod:`data_pipeline.options`.
    """

    name: str
    source: Source
    description: str = ""
    homepage: str = ""
    license: str = ""
    expects: str = ""
    modality: Optional[str] = None
    corpus: Optional[str] = None
    prefix: Optional[str] = None
    shard_size: Optional[int] = None
    fields: Fields = field(default_factory=Fields)
    filters: Filters = field(default_factory=Filters)
    text: TextOptions = field(default_factory=TextOptions)
    reader: ReaderOptions = field(default_factory=ReaderOptions)


def list_recipes() -> list[str]:
    """Names of the shipped recipes."""
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def recipe_path(name_or_path: Union[str, Path]) -> Path:
    p = Path(name_or_path)
    if p.is_file():
        return p
    shipped = RECIPE_DIR / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    raise PreprocessError(f"--recipe: {name_or_path} is neither a file nor a shipped recipe "
                          f"(known: {', '.join(list_recipes())})")


def load_recipe(name_or_path: Union[str, Path]) -> Recipe:
    """Load and validate a recipe; every problem is one :class:`PreprocessError` naming file and key."""
    path = recipe_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PreprocessError(f"{path}: not valid YAML ({first})") from None
    if not isinstance(data, dict):
        raise PreprocessError(f"{path}: a recipe is a mapping of settings, got {type(data).__name__}")
    moved = [k for k in data.get("filters") or {} if k in registry.names()]
    if moved:  # recipes written before the registry had filters.speech / filters.music
        raise PreprocessError(f"{path}: filters.{moved[0]}: per-modality limits go under "
                              f"filters.per_modality.{moved[0]}")
    try:
        recipe = from_dict(Recipe, data)
    except ConfigError as e:
        raise PreprocessError(f"{path}: {e}") from None
    # Cross-checks the schema alone cannot make: build the options and validate what does not need
    # an input path.
    opts = apply_recipe(PreprocessOptions(), recipe)
    try:
        _validate_settings(opts)
    except PreprocessError as e:
        raise PreprocessError(f"{path}: {e}") from None
    return recipe


def _validate_settings(opts: PreprocessOptions) -> None:
    """The parts of :meth:`PreprocessOptions.validate` that need neither paths nor codecs."""
    probe = dataclasses.replace(opts, input=str(RECIPE_DIR), out=str(RECIPE_DIR / "__never_written__"), tiny=True,
                                codecs=None, rank=0, world_size=1)
    probe.validate()  # reads nothing under input/out, writes nothing


def apply_recipe(opts: PreprocessOptions, recipe: Recipe) -> PreprocessOptions:
    """Options with the recipe's values filled in (callers then apply explicit command-line flags)."""
    return dataclasses.replace(
        opts,
        source=recipe.source,
        modality=recipe.modality,
        corpus=recipe.corpus or recipe.name,
        prefix=recipe.prefix or recipe.name,
        shard_size=recipe.shard_size or opts.shard_size,
        fields=dataclasses.replace(recipe.fields),
        filters=dataclasses.replace(recipe.filters),
        text=dataclasses.replace(recipe.text),
        reader=dataclasses.replace(recipe.reader),
        recipe=recipe.name,
    )


__all__ = ["Recipe", "RECIPE_DIR", "list_recipes", "load_recipe", "apply_recipe", "recipe_path"]
