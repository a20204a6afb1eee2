"""The grammar of the synthetic any-to-any corpus: attribute values, captions, held-out combinations.

Light to import (no Pillow, no audio libraries).  One :class:`Grammar` per modality drives everything
(the demo's modalities are the registered ones that have one, :func:`demo_modalities`): the corpus
generator draws attribute combinations from it, :func:`describe` turns a combination into the caption / transcript the
model must produce, :func:`parse_attributes` turns any text (a model's output included) back into the
attributes it names, and :func:`held_out_combinations` says which combinations never occur in training.

Why a held-out set: a model that memorised (caption, media) pairs would look perfect on items drawn
from the training combinations.  Holding some *combinations* out entirely (while every single attribute
value, and every pair of attribute values, is still seen in training) makes the test items ask for
composition, which is the behaviour the demo claims.

Held-out rules (deterministic, independent of the seed):

- image (shape × colour × position, 3·4·4 = 48): for shape index ``i`` and colour index ``j`` the
  position with index ``(i + j) % 4`` is held out -> 12 held-out triples; every (shape, colour),
  (shape, position) and (colour, position) pair still occurs in training.
- speech ("{number} {colour} {shape}s", 5·4·3 = 60): for shape ``i`` and colour ``j`` the number with
  index ``(i + j) % 5`` is held out -> 12 held-out sentences; every pair still occurs in training.
- music (tempo × scale × timbre, 2·2·3 = 12): the three triples (slow, major, flute),
  (fast, minor, organ), (fast, major, plucked) are held out -> every timbre occurs once in the held-out
  set, and every pair of attribute values still occurs in training.
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import Callable, Mapping

from anygpt import modalities as registry

SHAPES = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue", "yellow")
POSITIONS = ("left", "right", "top", "bottom")
NUMBERS = ("one", "two", "three", "four", "five")
TEMPOS = ("slow", "fast")
SCALES = ("major", "minor")
TIMBRES = ("flute", "organ", "plucked")

POSITION_PHRASE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}
_TIMBRE_PHRASE = {"flute": "a flute", "organ": "an organ", "plucked": "plucked strings"}


@dataclass(frozen=True)
class Grammar:
    """One modality's part of the synthetic task.  Demo content, not a fact about the modality: the
    demo runs on every registered modality that has one of these (:func:`demo_modalities`).

    Attributes:
        modality: the registered modality it is for.
        attributes: attribute name -> its values, in caption order.
        template: the caption's shape, for people (``corpus.json``).
        caption: a combination -> its canonical caption / sentence.
        held_out: the combinations that never occur in training (any order).
        held_out_rule: the rule behind ``held_out``, in words (``corpus.json``).
        codec_clusters: k-means clusters per codebook of the demo's fitted tiny codec.  Few codes per
            codebook: a small corpus teaches a tiny LM recurring codes, not thousands of rare ones
            (images get more: one codebook serves all 32 query slots of a span).
    """

    modality: str
    attributes: dict[str, tuple[str, ...]]
    template: str
    caption: Callable[[Mapping[str, str]], str]
    held_out: Callable[[], list[dict[str, str]]]
    held_out_rule: str
    codec_clusters: int


def _rotating_held_out(varied: str, values: tuple[str, ...]) -> Callable[[], list[dict[str, str]]]:
    """For shape index ``i`` and colour index ``j``, the value of ``varied`` with index ``(i + j) % n``."""
    def held() -> list[dict[str, str]]:
        return [{"shape": s, "colour": c, varied: values[(i + j) % len(values)]}
                for i, s in enumerate(SHAPES) for j, c in enumerate(COLOURS)]
    return held


_IMAGE = Grammar(
    modality="image",
    attributes={"shape": SHAPES, "colour": COLOURS, "position": POSITIONS},
    template="a {colour} {shape} {position_phrase}",
    caption=lambda a: f"a {a['colour']} {a['shape']} {POSITION_PHRASE[a['position']]}",
    held_out=_rotating_held_out("position", POSITIONS),
    held_out_rule="for shape index i and colour index j, position index (i + j) % 4 is held out",
    codec_clusters=128,
)
_SPEECH = Grammar(
    modality="speech",
    attributes={"number": NUMBERS, "colour": COLOURS, "shape": SHAPES},
    template="{number} {colour} {shape}(s)",
    caption=lambda a: f"{a['number']} {a['colour']} {a['shape']}{'' if a['number'] == 'one' else 's'}",
    held_out=_rotating_held_out("number", NUMBERS),
    held_out_rule="for shape index i and colour index j, number index (i + j) % 5 is held out",
    codec_clusters=64,
)
_MUSIC_HELD_OUT = (("slow", "major", "flute"), ("fast", "minor", "organ"), ("fast", "major", "plucked"))
_MUSIC = Grammar(
    modality="music",
    attributes={"tempo": TEMPOS, "scale": SCALES, "timbre": TIMBRES},
    template="a {tempo} melody in a {scale} key on {timbre_phrase}",
    caption=lambda a: f"a {a['tempo']} melody in a {a['scale']} key on {_TIMBRE_PHRASE[a['timbre']]}",
    held_out=lambda: [dict(zip(("tempo", "scale", "timbre"), t)) for t in _MUSIC_HELD_OUT],
    held_out_rule="the triples (slow, major, flute), (fast, minor, organ), (fast, major, plucked) are held out",
    codec_clusters=64,
)
GRAMMARS: dict[str, Grammar] = {g.modality: g for g in (_IMAGE, _SPEECH, _MUSIC)}

# Words (after lower-casing and stripping punctuation) that name each attribute value.  Synonyms and
# inflections make parsing robust to a model that says "squares", "colour" vs "color" words, digits.
_SYNONYMS: dict[str, dict[str, tuple[str, ...]]] = {
    "shape": {"circle": ("circle", "circles", "disc", "disk", "round"),
              "square": ("square", "squares", "box", "boxes"),
              "triangle": ("triangle", "triangles", "triangular")},
    "colour": {"red": ("red",), "green": ("green",), "blue": ("blue",), "yellow": ("yellow",)},
    "position": {"left": ("left",), "right": ("right",), "top": ("top", "above", "upper"),
                 "bottom": ("bottom", "below", "lower")},
    "number": {"one": ("one", "1", "a", "an", "single"), "two": ("two", "2"), "three": ("three", "3"),
               "four": ("four", "4"), "five": ("five", "5")},
    "tempo": {"slow": ("slow", "slowly", "calm"), "fast": ("fast", "quick", "quickly", "rapid")},
    "scale": {"major": ("major",), "minor": ("minor",)},
    "timbre": {"flute": ("flute", "flutes"), "organ": ("organ", "organs"),
               "plucked": ("plucked", "pluck", "strings", "string", "harp", "guitar")},
}

# "a"/"an" only count as the number one when nothing better is present (see parse_attributes).
_WEAK = {("number", "a"), ("number", "an")}


def demo_modalities() -> tuple[str, ...]:
    """The demo's modalities: the registered ones this grammar has content for, in registry order."""
    return tuple(m for m in registry.names() if m in GRAMMARS)


def grammar(modality: str) -> Grammar:
    """The grammar of one demo modality; ``ValueError`` naming the demo's modalities otherwise."""
    if modality not in GRAMMARS:
        raise ValueError(f"unknown synthetic modality {modality!r}; expected one of {', '.join(demo_modalities())}")
    return GRAMMARS[modality]


def attribute_values(modality: str) -> dict[str, list[str]]:
    """Attribute name -> its possible values, in caption order (e.g. image: shape, colour, position)."""
    return {name: list(values) for name, values in grammar(modality).attributes.items()}


def all_combinations(modality: str) -> list[dict[str, str]]:
    """Every attribute combination of a modality, in a fixed order."""
    values = attribute_values(modality)
    names = list(values)
    return [dict(zip(names, combo)) for combo in itertools.product(*values.values())]


def held_out_combinations(modality: str) -> list[dict[str, str]]:
    """Combinations that never occur in training (rules in the module docstring), in the order of
    :func:`all_combinations`, each with its attributes in caption order."""
    names = list(grammar(modality).attributes)
    held = {tuple(h[k] for k in names) for h in grammar(modality).held_out()}
    return [c for c in all_combinations(modality) if tuple(c.values()) in held]


def is_held_out(modality: str, attrs: Mapping[str, str]) -> bool:
    """Whether a combination is one of the held-out (test-only) ones."""
    key = tuple(attrs.get(k) for k in grammar(modality).attributes)
    return any(key == tuple(h.values()) for h in held_out_combinations(modality))


def train_combinations(modality: str) -> list[dict[str, str]]:
    """All combinations minus the held-out ones."""
    return [c for c in all_combinations(modality) if not is_held_out(modality, c)]


def describe(modality: str, attrs: Mapping[str, str]) -> str:
    """The canonical caption (or spoken sentence) for a combination."""
    g = grammar(modality)
    for name, values in g.attributes.items():
        if attrs.get(name) not in values:
            raise ValueError(f"{modality}: attribute {name}={attrs.get(name)!r} not in {list(values)}")
    return g.caption(attrs)


def words(text: str) -> list[str]:
    """Lower-cased words with punctuation removed (the normalisation every parser here uses)."""
    return re.findall(r"[a-z0-9]+", str(text).lower())


def parse_attributes(modality: str, text: str) -> dict[str, str]:
    """Attributes named in ``text``; attributes it does not name are absent from the result.

    Robust to case, punctuation, extra words, plurals and a few synonyms; when several values of one
    attribute are named, the first one wins (a model that rambles "a red circle, no, a blue one" is
    judged on what it said first).  For speech the number "one" may also be said as "a"/"an", which only
    counts when no other number word is present.
    """
    toks = words(text)
    out: dict[str, str] = {}
    for name in grammar(modality).attributes:
        lookup = {w: value for value, ws in _SYNONYMS[name].items() for w in ws}
        strong = [(pos, lookup[t]) for pos, t in enumerate(toks) if t in lookup and (name, t) not in _WEAK]
        weak = [(pos, lookup[t]) for pos, t in enumerate(toks) if t in lookup and (name, t) in _WEAK]
        found = strong or weak
        if found:
            out[name] = found[0][1]
    return out


def grammar_summary() -> dict:
    """JSON-able description of the grammar (written into ``corpus.json``)."""
    return {
        m: {
            "attributes": attribute_values(m),
            "template": grammar(m).template,
            "example": describe(m, all_combinations(m)[0]),
            "num_combinations": len(all_combinations(m)),
            "held_out": held_out_combinations(m),
        }
        for m in demo_modalities()
    }
