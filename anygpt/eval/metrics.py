"""Evaluation metrics that any evaluator imports: text normalisation, WER, BLEU, and judges of codes.

This module depends on nothing else in the project (NumPy at module level; jiwer and scikit-learn
inside the functions that need them), so the real-data harness (:mod:`anygpt.eval.real`), the demo's
synthetic task (:mod:`anygpt.demo.scoring`, :mod:`anygpt.demo.evaluate`) and any other caller can use
it without importing each other.

- Text: :func:`normalize_text`, :func:`edit_distance`, :func:`asr_wer` (jiwer on normalised text),
  :func:`bleu` / :func:`caption_metrics` (corpus BLEU-1..4, own implementation, plus exact match).
- Codes (text->X answers cannot be parsed back, so their codes are compared with the codes of reference
  media encoded by the same codec): :func:`code_features` (bag-of-codes histograms),
  :func:`nearest_reference_accuracy` (the nearest reference wins and its attributes are the prediction;
  chance is what a uniformly random pick among the candidates would score, computed from the candidates
  themselves) and :func:`classifier_attribute_accuracy` (a small logistic regression per attribute).

Why chance levels everywhere: "the model learned" is only a claim when a score is compared with what a
model that ignores its input would get, so every judge reports its chance beside its score.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any, Hashable, Mapping, Sequence

import numpy as np

__all__ = [
    "normalize_text", "edit_distance", "check_lengths", "code_features", "nearest_reference_accuracy",
    "classifier_attribute_accuracy", "asr_wer", "caption_metrics", "bleu",
]


# ------------------------------------------------------------------------------------- text helpers


def normalize_text(text: str) -> str:
    """Lower-case, punctuation to spaces (apostrophes inside words kept), whitespace collapsed.

    Number words stay words and digits stay digits (no conversion either way): the synthetic grammar and
    ASR references of LibriSpeech-style corpora spell numbers out, so converting would only hide errors.
    """
    t = str(text).lower().replace("\u2019", "'")
    t = re.sub(r"[^\w\s']|_", " ", t)
    t = re.sub(r"(?<!\w)'|'(?!\w)", " ", t)
    return " ".join(t.split())


def edit_distance(a: Sequence[str], b: Sequence[str]) -> int:
    """Levenshtein distance between two token sequences (insertions, deletions, substitutions)."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i] + [0] * len(b)
        for j, y in enumerate(b, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y))
        prev = cur
    return prev[-1]


def check_lengths(a: Sequence, b: Sequence, what: str) -> None:
    """``ValueError`` naming ``what`` unless predictions and references pair up one to one."""
    if len(a) != len(b):
        raise ValueError(f"{what}: {len(a)} predictions but {len(b)} references")


# ------------------------------------------------------------------------------------------- text->X


def _as_2d(codes: Any) -> np.ndarray:
    a = np.asarray(codes)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2:
        raise ValueError(f"codes must be [K, T] (or [T]), got shape {a.shape}")
    return a.astype(np.int64, copy=False)


def code_features(codes_list: Sequence[Any], codebook_size: int | None = None, num_codebooks: int | None = None,
                  bigrams: bool = False) -> np.ndarray:
    """Bag-of-codes features ``[N, D]``, L2-normalised, so a dot product is a cosine similarity.

    Per codebook ``k < num_codebooks`` a histogram of its codes over ``codebook_size`` bins, each
    L2-normalised, concatenated and divided by ``sqrt(num_codebooks)``.  With ``bigrams`` a second block per
    codebook counts consecutive code pairs hashed into ``codebook_size`` bins (captures order: rhythm,
    note changes).  Why histograms: generated and reference spans differ in length (speech), and a
    histogram compares *what* codes occur, independent of length and of small timing shifts.
    An empty array gives an all-zero row (similar to nothing).
    """
    arrays = [_as_2d(c) for c in codes_list]
    if not arrays:
        return np.zeros((0, 0), dtype=np.float32)
    k_all = num_codebooks if num_codebooks is not None else min(a.shape[0] for a in arrays)
    if codebook_size is None:
        codebook_size = max((int(a.max()) + 1 for a in arrays if a.size), default=1)
    v = int(codebook_size)
    blocks = 2 if bigrams else 1
    feats = np.zeros((len(arrays), k_all * blocks, v), dtype=np.float64)
    for i, a in enumerate(arrays):
        for k in range(min(k_all, a.shape[0])):
            row = a[k]
            row = row[(row >= 0) & (row < v)]
            if row.size:
                feats[i, k] = np.bincount(row, minlength=v)[:v]
            if bigrams and row.size > 1:
                pairs = (row[:-1] * 1000003 + row[1:]) % v
                feats[i, k_all + k] = np.bincount(pairs, minlength=v)[:v]
    norms = np.linalg.norm(feats, axis=2, keepdims=True)
    feats = np.divide(feats, norms, out=np.zeros_like(feats), where=norms > 0)
    flat = feats.reshape(len(arrays), -1) / math.sqrt(k_all * blocks)
    return flat.astype(np.float32)


def _compact_codes(gen: list[np.ndarray], ref: list[np.ndarray], k: int,
                   v: int) -> tuple[list[np.ndarray], list[np.ndarray], int]:
    """Renumber the codes in ``[0, v)`` of the first ``k`` codebooks to the symbols that occur at all.

    The cosine of histograms is unchanged (a symbol no array uses adds zero to every dot product and
    norm), but the histograms shrink from ``v`` bins to the symbols used: a per-slot image judge has
    ``v`` = 32 slots x 8192 codes, i.e. a gigabyte of dense float64 features for a few hundred
    references.  Codes outside ``[0, v)`` become ``-1`` (ignored, as before)."""
    rows = [a[:k] for a in gen + ref]
    flat = np.concatenate([r.ravel() for r in rows]) if rows else np.zeros(0, dtype=np.int64)
    symbols = np.unique(flat[(flat >= 0) & (flat < v)])

    def remap(a: np.ndarray) -> np.ndarray:
        a = a[:k]
        inside = (a >= 0) & (a < v)
        return np.where(inside, np.searchsorted(symbols, np.where(inside, a, 0)), -1)

    return [remap(a) for a in gen], [remap(a) for a in ref], max(len(symbols), 1)


def nearest_reference_accuracy(
    generated: Sequence[np.ndarray],
    targets: Sequence[int],
    references: Sequence[np.ndarray],
    *,
    reference_labels: Sequence[Hashable] | None = None,
    reference_attributes: Sequence[Mapping[str, str]] | None = None,
    codebook_size: int | None = None,
    bigrams: bool = False,
) -> dict[str, Any]:
    """Judge text->X generations by the nearest reference rendering.

    ``generated[i]`` is a code array ``[K, T]`` made for the caption whose reference is
    ``references[targets[i]]``.  Distance: ``1 - cosine`` between bag-of-codes features
    (:func:`code_features`: per-codebook normalised code histograms, optionally with hashed bigrams),
    computed on the first ``min K`` codebooks of all arrays (a speech LM generates layer 1 only, while
    references encoded by the codec may keep all 8 RVQ layers).  The nearest reference (first on ties) is
    the prediction; an empty generation predicts nothing (``-1``) and counts as wrong.

    - ``accuracy``: nearest reference is the target, or has the target's label when ``reference_labels``
      is given (several renderings of one caption share a label); ``chance_accuracy``: mean over items of
      (references with the target's label) / (number of references) -- a uniformly random pick.
    - with ``reference_attributes`` (one dict per reference): predicted attributes = those of the nearest
      reference; ``per_attribute``, ``mean_attribute``, ``exact_attributes`` and their ``chance_*`` (a
      uniform pick among the references, computed from the candidates).  This is the fairer "far above
      chance" signal: a near miss that gets two of three attributes right is visible.
    - ``score`` / ``chance``: mean attribute accuracy when attributes are given, else accuracy.
    - ``predictions``: index of the nearest reference per item; ``empty``: empty generations.
    """
    check_lengths(generated, targets, "nearest_reference_accuracy")
    n, n_ref = len(generated), len(references)
    if n_ref == 0:
        raise ValueError("nearest_reference_accuracy: no references")
    if any(not (0 <= int(t) < n_ref) for t in targets):
        raise ValueError(f"nearest_reference_accuracy: targets must index the {n_ref} references")
    if reference_labels is not None and len(reference_labels) != n_ref:
        raise ValueError("reference_labels must have one label per reference")
    if reference_attributes is not None and len(reference_attributes) != n_ref:
        raise ValueError("reference_attributes must have one dict per reference")
    gen_arrays, ref_arrays = [_as_2d(g) for g in generated], [_as_2d(r) for r in references]
    k = min(a.shape[0] for a in gen_arrays + ref_arrays)
    v = codebook_size
    if v is None:
        v = max((int(a[:k].max()) + 1 for a in gen_arrays + ref_arrays if a[:k].size), default=1)
    if not bigrams:
        gen_arrays, ref_arrays, v = _compact_codes(gen_arrays, ref_arrays, k, v)
    ref_f = code_features(ref_arrays, v, k, bigrams)
    preds = np.full(n, -1, dtype=np.int64)
    if n:
        gen_f = code_features(gen_arrays, v, k, bigrams)
        sims = gen_f @ ref_f.T
        nonempty = np.array([a[:k].size > 0 for a in gen_arrays])
        preds[nonempty] = sims[nonempty].argmax(axis=1)
    labels = list(reference_labels) if reference_labels is not None else list(range(n_ref))
    label_counts = Counter(labels)
    tg = [int(t) for t in targets]
    correct = [p >= 0 and labels[p] == labels[t] for p, t in zip(preds.tolist(), tg)]
    out: dict[str, Any] = {
        "n": n,
        "num_references": n_ref,
        "accuracy": float(np.mean(correct)) if n else float("nan"),
        "chance_accuracy": float(np.mean([label_counts[labels[t]] / n_ref for t in tg])) if n else float("nan"),
        "empty": int(sum(a[:k].size == 0 for a in gen_arrays)),
        "distance": "1 - cosine of bag-of-codes" + (" (+bigram)" if bigrams else "") + " histograms",
        "predictions": preds.tolist(),
    }
    out["score"], out["chance"] = out["accuracy"], out["chance_accuracy"]
    if reference_attributes is not None:
        attrs = [dict(a) for a in reference_attributes]
        names = list(attrs[tg[0]]) if n else list(attrs[0])
        per, chance_per = {}, {}
        for a in names:
            per[a] = float(np.mean([p >= 0 and attrs[p].get(a) == attrs[t].get(a)
                                    for p, t in zip(preds.tolist(), tg)])) if n else float("nan")
            chance_per[a] = float(np.mean([sum(r.get(a) == attrs[t].get(a) for r in attrs) / n_ref
                                           for t in tg])) if n else float("nan")
        exact = [p >= 0 and all(attrs[p].get(a) == attrs[t].get(a) for a in names) for p, t in zip(preds.tolist(), tg)]
        chance_exact = [sum(all(r.get(a) == attrs[t].get(a) for a in names) for r in attrs) / n_ref for t in tg]
        out.update({
            "per_attribute": per, "chance_per_attribute": chance_per,
            "mean_attribute": float(np.mean(list(per.values()))) if n else float("nan"),
            "chance_mean_attribute": float(np.mean(list(chance_per.values()))) if n else float("nan"),
            "exact_attributes": float(np.mean(exact)) if n else float("nan"),
            "chance_exact_attributes": float(np.mean(chance_exact)) if n else float("nan"),
        })
        out["score"], out["chance"] = out["mean_attribute"], out["chance_mean_attribute"]
    return out


def classifier_attribute_accuracy(
    generated: Sequence[np.ndarray],
    generated_attributes: Sequence[Mapping[str, str]],
    train_codes: Sequence[np.ndarray],
    train_attributes: Sequence[Mapping[str, str]],
    *,
    codebook_size: int | None = None,
    bigrams: bool = False,
    c: float = 1.0,
    seed: int = 0,
) -> dict[str, Any]:
    """Judge text->X generations with a small classifier instead of one nearest reference.

    One multinomial logistic regression per attribute (scikit-learn, on :func:`code_features`) is trained
    on codes of many reference renderings (``train_codes`` with their ``train_attributes``: e.g. several
    jittered renderings per caption, encoded by the codec), then predicts the attributes
    of each generation; ``generated_attributes`` are the attributes the caption asked for.  Why: with
    jittered renderings a single nearest neighbour is noisy, a classifier averages over variants.  Caveat:
    histograms are high-dimensional (``K·codebook_size``) and sparse, so with few training renderings the
    classifier overfits (``train_accuracy`` 1.0, test near chance, as measured on the tiny music codec with
    160 clips); ``c`` is the inverse L2 strength.  Prefer :func:`nearest_reference_accuracy` there.
    Returns ``per_attribute``, ``mean_attribute``, ``exact_attributes``, ``train_accuracy`` (the judge's own
    fit, a sanity check) and chance levels = 1 / (number of classes) per attribute, product for exact;
    ``score`` / ``chance`` = mean attribute accuracy and its chance.
    """
    from sklearn.linear_model import LogisticRegression

    check_lengths(generated, generated_attributes, "classifier_attribute_accuracy")
    if len(train_codes) != len(train_attributes) or not train_codes:
        raise ValueError("classifier_attribute_accuracy: need one attribute dict per training code array")
    arrays = [_as_2d(c) for c in list(train_codes) + list(generated)]
    k = min(a.shape[0] for a in arrays)
    v = codebook_size or max((int(a[:k].max()) + 1 for a in arrays if a[:k].size), default=1)
    x_train = code_features(train_codes, v, k, bigrams)
    x_gen = code_features(generated, v, k, bigrams) if len(generated) else np.zeros((0, x_train.shape[1]), np.float32)
    names = list(train_attributes[0])
    per, chance_per, train_acc = {}, {}, {}
    right = np.ones(len(generated), dtype=bool)
    for a in names:
        y = [t[a] for t in train_attributes]
        classes = sorted(set(y))
        chance_per[a] = 1.0 / len(classes)
        if len(classes) == 1:
            pred = np.array([classes[0]] * len(generated), dtype=object)
            train_acc[a] = 1.0
        else:
            clf = LogisticRegression(C=c, max_iter=2000, random_state=seed)
            clf.fit(x_train, y)
            train_acc[a] = float(clf.score(x_train, y))
            pred = clf.predict(x_gen) if len(generated) else np.array([], dtype=object)
        ok = np.array([p == g.get(a) for p, g in zip(pred, generated_attributes)], dtype=bool)
        per[a] = float(ok.mean()) if len(ok) else float("nan")
        right &= ok if len(ok) else right
    out = {
        "n": len(generated),
        "per_attribute": per, "chance_per_attribute": chance_per,
        "mean_attribute": float(np.mean(list(per.values()))),
        "chance_mean_attribute": float(np.mean(list(chance_per.values()))),
        "exact_attributes": float(right.mean()) if len(generated) else float("nan"),
        "chance_exact_attributes": float(np.prod(list(chance_per.values()))),
        "train_accuracy": train_acc,
        "judge": "logistic regression on bag-of-codes" + (" (+bigram)" if bigrams else "") + " histograms",
    }
    out["score"], out["chance"] = out["mean_attribute"], out["chance_mean_attribute"]
    return out


# --------------------------------------------------------------------------------- real-data harness


def asr_wer(hyps: Sequence[str], refs: Sequence[str]) -> dict[str, Any]:
    """Corpus word error rate with jiwer after :func:`normalize_text` on both sides.

    Pairs whose reference is empty after normalisation are skipped (WER is undefined for them) and counted
    in ``skipped_empty_refs``.  Returns ``wer``, ``cer``, ``n``, ``substitutions``, ``deletions``,
    ``insertions``, ``hits`` (word level) and ``ref_words``.
    """
    import jiwer

    check_lengths(hyps, refs, "asr_wer")
    pairs = [(normalize_text(h), normalize_text(r)) for h, r in zip(hyps, refs)]
    kept = [(h, r) for h, r in pairs if r]
    out: dict[str, Any] = {"n": len(kept), "skipped_empty_refs": len(pairs) - len(kept)}
    if not kept:
        return {**out, "wer": float("nan"), "cer": float("nan"), "substitutions": 0, "deletions": 0,
                "insertions": 0, "hits": 0, "ref_words": 0}
    h, r = [p[0] for p in kept], [p[1] for p in kept]
    words = jiwer.process_words(r, h)
    chars = jiwer.process_characters(r, h)
    return {**out, "wer": float(words.wer), "cer": float(chars.cer), "substitutions": int(words.substitutions),
            "deletions": int(words.deletions), "insertions": int(words.insertions), "hits": int(words.hits),
            "ref_words": int(words.hits + words.substitutions + words.deletions)}


def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def bleu(hyps: Sequence[str], refs: Sequence[str | Sequence[str]], max_n: int = 4) -> dict[str, float]:
    """Corpus BLEU-1..``max_n`` (Papineni et al. 2002) on :func:`normalize_text` tokens, no smoothing.

    Clipped n-gram precisions are summed over the corpus; BLEU-n is the brevity penalty times the geometric
    mean of precisions 1..n (uniform weights); the effective reference length is the closest reference
    length per sentence (the shorter one on ties).  Several references per hypothesis are allowed.
    """
    check_lengths(hyps, refs, "bleu")
    matches, totals = [0] * max_n, [0] * max_n
    hyp_len = ref_len = 0
    for h, r in zip(hyps, refs):
        rs = [r] if isinstance(r, str) else list(r)
        ht = normalize_text(h).split()
        rts = [normalize_text(x).split() for x in rs] or [[]]
        hyp_len += len(ht)
        ref_len += min((abs(len(x) - len(ht)), len(x)) for x in rts)[1]
        for n in range(1, max_n + 1):
            hc = _ngrams(ht, n)
            best: Counter = Counter()
            for x in rts:
                best |= _ngrams(x, n)
            matches[n - 1] += sum(min(c, best[g]) for g, c in hc.items())
            totals[n - 1] += max(0, len(ht) - n + 1)
    bp = 0.0 if hyp_len == 0 else (1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len))
    out: dict[str, float] = {"brevity_penalty": bp}
    for n in range(1, max_n + 1):
        ps = [matches[i] / totals[i] if totals[i] else 0.0 for i in range(n)]
        out[f"bleu{n}"] = 0.0 if min(ps) == 0 else bp * math.exp(sum(math.log(p) for p in ps) / n)
    return out


def caption_metrics(hyps: Sequence[str], refs: Sequence[str | Sequence[str]]) -> dict[str, Any]:
    """Captioning metrics: corpus BLEU-1..4 (:func:`bleu`) and exact match after :func:`normalize_text`.

    ``refs[i]`` is one reference string or a list of references for ``hyps[i]`` (exact match: equal to any).
    """
    check_lengths(hyps, refs, "caption_metrics")
    exact = 0
    for h, r in zip(hyps, refs):
        rs = [r] if isinstance(r, str) else list(r)
        exact += int(normalize_text(h) in {normalize_text(x) for x in rs})
    n = len(hyps)
    return {"n": n, **bleu(hyps, refs), "exact_match": exact / n if n else float("nan")}
