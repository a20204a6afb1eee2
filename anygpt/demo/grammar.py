"""The grammar of the synthetic any-to-any corpus: attribute values, captions, held-out combinations.

Pure Python (no NumPy, no Pillow) so that evaluation can parse captions back into attributes without
importing anything heavy.  One table per modality drives everything: the corpus generator draws
attribute combinations from it, :func:`describe` turns a combination into the caption / transcript the
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
from typing import Mapping

MODALITIES = ("image", "speech", "music")

SHAPES = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue", "yellow")
POSITIONS = ("left", "right", "top", "bottom")
NUMBERS = ("one", "two", "three", "four", "five")
TEMPOS = ("slow", "fast")
SCALES = ("major", "minor")
TIMBRES = ("flute", "organ", "plucked")

# Attribute names in caption order, per modality.
_ATTRIBUTES: dict[str, dict[str, tuple[str, ...]]] = {
    "image": {"shape": SHAPES, "colour": COLOURS, "position": POSITIONS},
    "speech": {"number": NUMBERS, "colour": COLOURS, "shape": SHAPES},
    "music": {"tempo": TEMPOS, "scale": SCALES, "timbre": TIMBRES},
}

POSITION_PHRASE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}
_TIMBRE_PHRASE = {"flute": "a flute", "organ": "an organ", "plucked": "plucked strings"}

TEMPLATES = {
    "image": "a {colour} {shape} {position_phrase}",
    "speech": "{number} {colour} {shape}(s)",
    "music": "a {tempo} melody in a {scale} key on {timbre_phrase}",
}

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

_MUSIC_HELD_OUT = (("slow", "major", "flute"), ("fast", "minor", "organ"), ("fast", "major", "plucked"))


def _check_modality(modality: str) -> None:
    if modality not in _ATTRIBUTES:
        raise ValueError(f"unknown synthetic modality {modality!r}; expected one of {', '.join(MODALITIES)}")


def attribute_values(modality: str) -> dict[str, list[str]]:
    """Attribute name -> its possible values, in caption order (e.g. image: shape, colour, position)."""
    _check_modality(modality)
    return {name: list(values) for name, values in _ATTRIBUTES[modality].items()}


def all_combinations(modality: str) -> list[dict[str, str]]:
    """Every attribute combination of a modality, in a fixed order."""
    values = attribute_values(modality)
    names = list(values)
    return [dict(zip(names, combo)) for combo in itertools.product(*values.values())]


def held_out_combinations(modality: str) -> list[dict[str, str]]:
    """Combinations that never occur in training (rules in the module docstring)."""
    _check_modality(modality)
    held = []
    if modality == "image":
        for i, shape in enumerate(SHAPES):
            for j, colour in enumerate(COLOURS):
                held.append({"shape": shape, "colour": colour, "position": POSITIONS[(i + j) % len(POSITIONS)]})
    elif modality == "speech":
        for i, shape in enumerate(SHAPES):
            for j, colour in enumerate(COLOURS):
                held.append({"number": NUMBERS[(i + j) % len(NUMBERS)], "colour": colour, "shape": shape})
        held = [{k: h[k] for k in _ATTRIBUTES["speech"]} for h in held]
    else:
        held = [dict(zip(_ATTRIBUTES["music"], t)) for t in _MUSIC_HELD_OUT]
    order = {tuple(c.values()): n for n, c in enumerate(all_combinations(modality))}
    return sorted(held, key=lambda c: order[tuple(c[k] for k in _ATTRIBUTES[modality])])


def is_held_out(modality: str, attrs: Mapping[str, str]) -> bool:
    """Whether a combination is one of the held-out (test-only) ones."""
    key = tuple(attrs.get(k) for k in _ATTRIBUTES[modality])
    return any(key == tuple(h.values()) for h in held_out_combinations(modality))


def train_combinations(modality: str) -> list[dict[str, str]]:
    """All combinations minus the held-out ones."""
    return [c for c in all_combinations(modality) if not is_held_out(modality, c)]


def describe(modality: str, attrs: Mapping[str, str]) -> str:
    """The canonical caption (image, music) or sentence (speech) for a combination."""
    _check_modality(modality)
    for name, values in _ATTRIBUTES[modality].items():
        if attrs.get(name) not in values:
            raise ValueError(f"{modality}: attribute {name}={attrs.get(name)!r} not in {list(values)}")
    if modality == "image":
        return f"a {attrs['colour']} {attrs['shape']} {POSITION_PHRASE[attrs['position']]}"
    if modality == "speech":
        plural = "" if attrs["number"] == "one" else "s"
        return f"{attrs['number']} {attrs['colour']} {attrs['shape']}{plural}"
    return f"a {attrs['tempo']} melody in a {attrs['scale']} key on {_TIMBRE_PHRASE[attrs['timbre']]}"


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
    _check_modality(modality)
    toks = words(text)
    out: dict[str, str] = {}
    for name in _ATTRIBUTES[modality]:
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
            "template": TEMPLATES[m],
            "example": describe(m, all_combinations(m)[0]),
            "num_combinations": len(all_combinations(m)),
            "held_out": held_out_combinations(m),
        }
        for m in MODALITIES
    }
