"""Scores of the synthetic task's X->text answers, with their chance levels computed from the grammar.

The grammar is known (:mod:`anygpt.demo.grammar`), so chance is computed exactly instead of estimated:
a generated caption / transcript is parsed back into attributes (:func:`attribute_accuracy`); a uniform
guess over each attribute's values is right with probability ``1/|values|``, and an exact match (every
attribute right) by chance has probability ``prod(1/|values|)``.  The headline ``score`` is the mean
attribute accuracy (its chance is the mean of ``1/|values|``): exact match on held-out combinations is
harsh for a tiny model, and the per-attribute view shows *what* it learned.  Transcripts (modalities
whose ``text_kind`` is ``"transcript"``) also get a WER beside the expected WER of a random sentence.

The generic metrics (WER, BLEU, the judges of text->X codes) live in :mod:`anygpt.eval.metrics`.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from anygpt import modalities as registry
from anygpt.demo.grammar import all_combinations, attribute_values, describe, parse_attributes
from anygpt.eval.metrics import asr_wer, check_lengths, edit_distance, normalize_text

__all__ = ["chance_levels", "attribute_accuracy", "chance_wer"]


def chance_levels(modality: str) -> dict[str, Any]:
    """Chance of a uniform guess over each attribute's values: per attribute, mean, and exact (product)."""
    values = attribute_values(modality)
    per = {name: 1.0 / len(v) for name, v in values.items()}
    return {"chance_per_attribute": per, "chance_mean_attribute": float(np.mean(list(per.values()))),
            "chance_exact": float(np.prod(list(per.values())))}


def chance_wer(modality: str, references: Sequence[str]) -> float:
    """Expected corpus WER of a uniformly random grammatical sentence (exact, by enumeration)."""
    sentences = [normalize_text(describe(modality, c)).split() for c in all_combinations(modality)]
    errors, words = 0.0, 0
    cache: dict[tuple[str, ...], float] = {}
    for ref in references:
        r = tuple(normalize_text(ref).split())
        if not r:
            continue
        if r not in cache:
            cache[r] = float(np.mean([edit_distance(r, s) for s in sentences]))
        errors += cache[r]
        words += len(r)
    return errors / words if words else float("nan")


def attribute_accuracy(modality: str, predictions: Sequence[str], references: Sequence[str]) -> dict[str, Any]:
    """Score generated captions / transcripts against references by the attributes they name.

    Both sides are parsed with :func:`anygpt.demo.grammar.parse_attributes`; an attribute the prediction
    does not name counts as wrong (``unparsed`` counts predictions missing at least one).  Returns:

    - ``n``; ``exact`` (all attributes right) and ``chance_exact``; ``exact_string`` (normalised strings
      equal); ``per_attribute`` / ``chance_per_attribute``; ``mean_attribute`` / ``chance_mean_attribute``;
    - ``score`` / ``chance``: the headline pair, = mean attribute accuracy and its chance;
    - transcripts only (the plugin's ``text_kind``): ``wer`` (jiwer, corpus level, on
      :func:`~anygpt.eval.metrics.normalize_text` output) and ``chance_wer`` (expected WER of a uniformly
      random sentence of the grammar -- lower is better for WER).
    """
    check_lengths(predictions, references, "attribute_accuracy")
    names = list(attribute_values(modality))
    chance = chance_levels(modality)
    n = len(references)
    hits = {a: 0 for a in names}
    exact = exact_string = unparsed = 0
    for pred, ref in zip(predictions, references):
        p, r = parse_attributes(modality, pred), parse_attributes(modality, ref)
        missing_ref = [a for a in names if a not in r]
        if missing_ref:
            raise ValueError(f"reference {ref!r} does not name {', '.join(missing_ref)} ({modality} grammar)")
        ok = [p.get(a) == r[a] for a in names]
        for a, good in zip(names, ok):
            hits[a] += int(good)
        exact += int(all(ok))
        exact_string += int(normalize_text(pred) == normalize_text(ref))
        unparsed += int(any(a not in p for a in names))
    per = {a: hits[a] / n if n else float("nan") for a in names}
    out: dict[str, Any] = {
        "modality": modality,
        "n": n,
        "exact": exact / n if n else float("nan"),
        "exact_string": exact_string / n if n else float("nan"),
        "per_attribute": per,
        "mean_attribute": float(np.mean(list(per.values()))) if n else float("nan"),
        "unparsed": unparsed,
        **chance,
    }
    out["score"], out["chance"] = out["mean_attribute"], chance["chance_mean_attribute"]
    if registry.get(modality).text_kind == "transcript" and n:
        out["wer"] = asr_wer(list(predictions), list(references))["wer"]
        out["chance_wer"] = chance_wer(modality, references)
    return out
