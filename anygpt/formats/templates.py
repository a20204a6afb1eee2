"""Stage-1 pretraining templates (X->text and text->X) with instruction pools, and the chat defaults.

Stage 1 renders a text-centric pair in one of two directions (DESIGN.md)::

    X->text:  [Human]: {instruction} {<so*> ids <eo*>}<eoh> [AnyGPT]: {text}<eom>
    text->X:  [Human]: {instruction} This is input: {text}<eoh> [AnyGPT]: {<so*> ids <eo*>}<eom>

The instruction is drawn from a pool per modality and direction so the model learns the task from
the wording rather than from one fixed string.  Pools are our own phrasings (>= 30 each for the
built-in modalities), built from each modality plugin's hand-written openers and nouns
(:class:`anygpt.modalities.plugin.Modality`) so every combination is a natural sentence.  The words
live with the plugin, the combination rule here: a trained model's prompts stay exactly what it saw.
"""
from __future__ import annotations

import itertools
import random
from typing import Any, Literal, Sequence

from anygpt import modalities as registry
from anygpt.formats.segments import Conversation, Media, Part, Text, Turn
from anygpt.modalities import CodecError

Direction = Literal["x2text", "text2x"]

# A literal on purpose: models were trained with this exact text, whatever modalities exist later.
DEFAULT_SYSTEM_PROMPT = (
    "You are AnyGPT, an assistant that understands and generates text, speech, images and music."
)


def _pool(openers: Sequence[str], nouns: Sequence[str], text2x: bool) -> tuple[str, ...]:
    out = []
    for opener, noun in itertools.product(openers, nouns):
        article = "an" if noun[0] in "aeiou" else "a"
        out.append(opener.format(the="the" if not text2x else "", a=article, noun=noun).replace("  ", " "))
    return tuple(dict.fromkeys(out))  # keep order, drop duplicates


# Built on first use per (modality, direction): a plugin registered after this module was imported
# (a test module, $ANYGPT_PLUGINS) still gets its pool.
_POOLS: dict[tuple[str, Direction], tuple[str, ...]] = {}


def instruction_pool(modality: str, direction: Direction) -> tuple[str, ...]:
    """The instruction pool of a registered modality in one direction, from its plugin's words
    (``nouns`` x ``x2text_openers`` / ``text2x_openers``)."""
    key = (modality, direction)
    if key not in _POOLS:
        if direction not in ("x2text", "text2x"):
            raise ValueError(f"no instruction pool for {modality!r} {direction!r} (direction x2text or text2x)")
        try:
            plugin = registry.get(modality)
        except CodecError as e:
            raise ValueError(f"no instruction pool for {modality!r}: {e}") from None
        if not plugin.nouns:
            raise ValueError(f"modality {modality!r} has no nouns for its instruction pool")
        openers = plugin.x2text_openers if direction == "x2text" else plugin.text2x_openers
        _POOLS[key] = _pool(openers, plugin.nouns, text2x=direction == "text2x")
    return _POOLS[key]


def instruction_pools() -> dict[tuple[str, Direction], tuple[str, ...]]:
    """Every registered modality's pools, ``(modality, direction) -> instructions``, in registry order."""
    return {(m, d): instruction_pool(m, d) for m in registry.names() for d in ("x2text", "text2x")}


def __getattr__(name: str) -> Any:
    # ``INSTRUCTIONS`` (all pools) stays importable; computed when asked, so it sees every plugin.
    if name == "INSTRUCTIONS":
        return instruction_pools()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def pretrain_pair(modality: str, media: Media, text: str, direction: Direction,
                  rng: random.Random | None = None, instruction: str | None = None) -> Conversation:
    """A stage-1 example: one user turn and one assistant turn in the given direction."""
    rng = rng or random.Random()
    instruction = instruction or rng.choice(instruction_pool(modality, direction))
    if direction == "x2text":
        user: list[Part] = [Text(f"{instruction} "), media]
        answer: list[Part] = [Text(text)]
    elif direction == "text2x":
        user = [Text(f"{instruction} This is input: {text}")]
        answer = [media]
    else:
        raise ValueError(f"direction must be x2text or text2x, not {direction!r}")
    return Conversation([Turn("user", user), Turn("assistant", answer)])
