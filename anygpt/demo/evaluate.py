"""The synthetic task's evaluation: every direction of every demo modality on held-out items, against chance.

``anygpt demo`` runs it after training; ``anygpt eval --demo DIR`` runs it again on a demo's output
through ``DIR/eval_suite.json`` (which names :func:`score_demo`), so eval never imports the demo.

- X->text: greedy caption/transcript, parsed back into attributes (mean attribute accuracy,
  :func:`anygpt.demo.scoring.attribute_accuracy`);
- text->X: sampled codes judged by the nearest *reference* (:func:`anygpt.eval.metrics.nearest_reference_accuracy`):
  every caption of the grammar is rendered (:func:`anygpt.demo.corpus.render_reference`) and encoded with
  the same codec, next to the training items' codes, and the generated codes get the attributes of the
  closest reference (bag-of-codes cosine; per slot for modalities with a fixed span length, see
  :func:`judge_codes`).  So a text->image answer scores only if its codes look like an image of the
  requested attributes.

Every direction is scored on half novel items (held-out attribute combinations: composition) and half
new renderings of seen combinations (generalisation), each half also alone (``by_split``); text->X rows
also carry the judge's ceiling (the judge on the held-out items' own codes).
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from anygpt import modalities as registry
from anygpt.data.schema import decode_sample
from anygpt.demo.corpus import render_reference
from anygpt.demo.grammar import all_combinations, demo_modalities, describe, parse_attributes
from anygpt.demo.scoring import attribute_accuracy
from anygpt.eval.metrics import nearest_reference_accuracy
from anygpt.eval.run import answer_media, answer_text
from anygpt.infer.settings import GenerationConfig, apply_setting_overrides
from anygpt.layout import ModalitySpec, VocabLayout
from anygpt.modalities.fit import load_inputs
from data_pipeline.shards import iter_samples

EVAL_SUITE = "eval_suite.json"

# Held-out items asked for per direction (at most half novel combinations, the rest seen ones): the
# default corpus's 80 test items give 40 novel + all 27 seen.  Sampled text->X scores are noisy on few
# items: with 48, text->speech moved by 0.2 between two sampling seeds in one run; with these 67, by
# 0.01-0.07 in the runs measured.
HELD_OUT_ITEMS = 80

# text->X sampling of the synthetic task: the per-modality defaults (AnyGPT's release settings) without
# their repetition penalties (speech 1.05, music 1.15), which suit full 1024/2048-code books; with the
# few dozen codes a fitted tiny codec uses, they push away the repeats a held note or a rest is made of.
SYNTHETIC_SAMPLING = ("all.repetition_penalty=1.0",)


def shard_items(shards_dir: Path, modality: str, n: int) -> list[tuple[str, str, np.ndarray]]:
    """First ``n`` items ``(key, text, codes [K, T])`` of a shard set, read through the one shard reader.

    Shards keep manifest order, in which the demo corpus puts novel (held-out) combinations first."""
    items = []
    for raw in iter_samples(shards_dir, decode=False):
        sample = decode_sample(raw)
        items.append((sample.key, sample.text, sample.codes(modality)))
        if len(items) >= n:
            break
    return items


def _attribute_hits(scores: dict, ref_attrs: list[dict], wanted: list[dict]) -> list[float]:
    """Per item: fraction of requested attributes that the nearest reference has (0 when empty)."""
    out = []
    for pred, want in zip(scores["predictions"], wanted):
        got = ref_attrs[pred] if pred >= 0 else {}
        out.append(sum(got.get(a) == v for a, v in want.items()) / max(len(want), 1))
    return out


REFERENCE_CACHE = "judge_references"  # DIR/judge_references/<modality>.npz


def _fingerprint(modality: str, codec: Any, layout: VocabLayout, shards_root: Path, max_train: int) -> str:
    """What the references depend on: the codec's weights, the layout's range, the training shards."""
    import hashlib

    h = hashlib.sha1(json.dumps([modality, layout.modality(modality).num_codebooks, max_train]).encode())
    for name, t in sorted(codec.state_dict().items()):  # a Codec is a torch module
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    for tar in sorted((shards_root / f"train_{modality}").glob("*.tar")):
        h.update(f"{tar.name}:{tar.stat().st_size}".encode())
    return h.hexdigest()


def _references(modality: str, codec: Any, layout: VocabLayout, work: Path, shards_root: Path,
                max_train: int = 400) -> tuple[list[np.ndarray], list[dict]]:
    """Reference codes with their attributes: one rendering of *every* grammar combination (held-out
    ones included), read back with the plugin's reader, plus up to ``max_train`` training items (the
    codec's real spread of renderings).

    Kept in ``DIR/judge_references/<modality>.npz`` (next to ``DIR/shards``) under a fingerprint of
    the codec's weights and the training shards: rendering and encoding them is the slow part of the
    judge (60 spoken sentences through the speech codec take ~30 s on 2 cores), and the demo's
    evaluation and its alignment stage's judge reward use the same references.
    """
    cache = Path(shards_root).parent / REFERENCE_CACHE / f"{modality}.npz"
    key = _fingerprint(modality, codec, layout, Path(shards_root), max_train)
    if cache.is_file():
        try:
            with np.load(cache, allow_pickle=False) as z:
                if str(z["key"]) == key:
                    attrs = json.loads(str(z["attrs"]))
                    return [z[f"c{i}"] for i in range(len(attrs))], attrs
        except (OSError, ValueError, KeyError):
            pass  # unreadable or stale: computed again and rewritten
    combos = all_combinations(modality)
    suffix = registry.get(modality).output_suffix
    paths = [render_reference(modality, describe(modality, c), work / f"{modality}-{i}{suffix}")
             for i, c in enumerate(combos)]
    k = layout.modality(modality).num_codebooks
    codes = [c[:k] for c in codec.encode(load_inputs(modality, paths, codec))]
    attrs = list(combos)
    for _, text, c in shard_items(shards_root / f"train_{modality}", modality, max_train):
        codes.append(c[:k])
        attrs.append(parse_attributes(modality, text))
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.stem}-{os.getpid()}.npz")
        np.savez(tmp, key=np.array(key), attrs=np.array(json.dumps(attrs)),
                 **{f"c{i}": np.asarray(c, dtype=np.int64) for i, c in enumerate(codes)})
        os.replace(tmp, cache)  # several processes may write it; readers see a whole file
    except OSError:
        pass  # a read-only demo directory: no cache, same references
    return codes, attrs


def judge_codes(spec: ModalitySpec, codes: list[np.ndarray]) -> tuple[list[np.ndarray], int]:
    """Codes as the judge compares them, and the number of distinct symbols.

    A modality with a fixed span length (``spec.span_length``: SEED's 32 query slots per image) is judged
    per slot: each (slot, code) pair becomes one symbol, so the bag-of-codes cosine becomes the fraction
    of slots that agree (such a code's meaning depends on its slot).  Others stay a bag of codes per
    codebook (robust to timing)."""
    size = spec.codebook_size
    if spec.span_length is None:
        return codes, size
    out = [c + (np.arange(c.shape[-1]) * size)[None] for c in codes]
    return out, size * max((c.shape[-1] for c in codes), default=1)


class AttributeJudge:
    """The text->X judge of :func:`evaluate_synthetic` for one answer at a time (the alignment stage's
    ``judge`` reward): the attributes of the nearest reference, as a fraction of those asked for.

    Same references (:func:`_references`), same per-slot symbols (:func:`judge_codes`) and the same
    cosine of per-codebook code histograms as the evaluation, so an answer scores here exactly what
    it scores in ``report.json``; the reference features are computed once, over the symbols the
    references use (an image's symbols are ``slot x code``: a dense histogram would have 262k bins),
    with each answer's norm taken over all of its symbols so the cosine is unchanged.

    Args:
        layout: the model's vocabulary layout.
        codecs: modality -> codec (the demo's fitted codecs).
        shards_root: the demo's ``shards/`` (training items join the references).
        modalities: which demo modalities to judge (default: the demo's that the layout has).
    """

    def __init__(self, layout: VocabLayout, codecs: dict[str, Any], shards_root: Path,
                 modalities: Sequence[str] | None = None, max_train: int = 400):
        self.layout = layout
        self.modalities = tuple(m for m in (modalities or demo_modalities()) if m in layout.modalities)
        self._refs: dict[str, tuple[np.ndarray, dict[int, int], list[dict]]] = {}
        with tempfile.TemporaryDirectory() as tmp:
            for m in self.modalities:
                codes, attrs = _references(m, codecs[m], layout, Path(tmp), Path(shards_root), max_train)
                refs_j, _ = judge_codes(layout.modality(m), codes)
                k = min(r.shape[0] for r in refs_j)
                vocab = sorted({int(x) for r in refs_j for x in np.unique(r[:k])})
                index = {c: i for i, c in enumerate(vocab)}
                feats = np.stack([self._features(r[:k], index) for r in refs_j])
                self._refs[m] = (feats, index, attrs)

    @staticmethod
    def _features(codes: np.ndarray, index: dict[int, int]) -> np.ndarray:
        """``[K, V]`` per-codebook histograms over ``index``'s symbols, each divided by the norm of the
        codebook's full histogram (symbols outside ``index`` count in the norm only)."""
        out = np.zeros((codes.shape[0], len(index)), dtype=np.float64)
        for k, row in enumerate(codes):
            if not row.size:
                continue
            values, counts = np.unique(row, return_counts=True)
            norm = float(np.sqrt((counts.astype(np.float64) ** 2).sum()))
            for v, c in zip(values.tolist(), counts.tolist()):
                if v in index:
                    out[k, index[v]] = c / norm
        return out

    def score(self, modality: str, texts: Sequence[str], codes: Sequence[np.ndarray | None],
              temperature: float = 0.0) -> list[float]:
        """Per answer: the fraction of the attributes its text asks for that the nearest reference
        has (0 for an empty answer or a text that names no attribute).

        ``temperature`` > 0 scores the expected fraction under a softmax of the similarities to every
        reference instead of the nearest one only: a dense reward that also tells an answer close to
        the right references from one barely nearer to them than to wrong ones (0 = the evaluation)."""
        feats, index, attrs = self._refs[modality]
        spec = self.layout.modality(modality)
        k = feats.shape[1]
        out = []
        for text, c in zip(texts, codes):
            wanted = parse_attributes(modality, text)
            if c is None or np.asarray(c).size == 0 or not wanted:
                out.append(0.0)
                continue
            (gen,), _ = judge_codes(spec, [np.asarray(c, dtype=np.int64)[:k]])
            f = self._features(gen[:k], index)
            sims = np.einsum("rkv,kv->r", feats, f)

            def hits(ref: dict) -> float:
                return sum(ref.get(a) == v for a, v in wanted.items()) / len(wanted)

            if temperature <= 0:
                out.append(hits(attrs[int(np.argmax(sims))]))  # first of ties, as the evaluation
            else:
                w = np.exp((sims - sims.max()) / temperature)
                out.append(float(w @ np.array([hits(r) for r in attrs]) / w.sum()))
        return out


def evaluate_synthetic(lm: Any, codecs: dict[str, Any], shards_root: Path, n_items: int = HELD_OUT_ITEMS,
                       batch_size: int = HELD_OUT_ITEMS, seed: int = 0,
                       sampling: Sequence[str] = SYNTHETIC_SAMPLING, text2x_only: bool = False) -> dict[str, Any]:
    """Score both directions of every demo modality the model's layout has on ``n_items`` held-out test
    items per direction (at most half of them novel attribute combinations, the rest new renderings of
    seen ones)
    from the demo's test shards.  ``sampling``: ``MODE.FIELD=VALUE`` overrides of the text->X sampling
    settings; ``text2x_only``: skip the X->text directions (the alignment stage's before/after)."""
    # X->text is scored greedily (one best caption).  text->X samples with the per-modality defaults
    # (seeded): the argmax of every code slot is the majority code (background), so greedy media
    # collapse to one mode, while samples follow the model's conditional distribution.
    sampled = GenerationConfig(max_new_tokens=512, seed=seed)
    sampled.modes = apply_setting_overrides(sampled.modes, sampling)
    base = sampled.with_greedy()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for m in (m for m in demo_modalities() if m in lm.layout.modalities):
            # Half novel (held-out attribute combinations: composition), half seen combinations
            # rendered afresh (generalisation to new renderings); each half is also scored alone.
            everything = shard_items(shards_root / f"test_{m}", m, 10**9)
            novel_items = [it for it in everything if "novel" in it[0]]
            seen_items = [it for it in everything if "novel" not in it[0]]
            items = novel_items[: n_items // 2] + seen_items[: n_items - min(n_items // 2, len(novel_items))]
            keys = [key for key, _, _ in items]
            texts = [t for _, t, _ in items]
            spec = lm.layout.modality(m)
            novel = [i for i, key in enumerate(keys) if "novel" in key]
            seen = [i for i in range(len(keys)) if i not in set(novel)]
            # X -> text
            t0 = time.perf_counter()
            if not text2x_only:
                preds = answer_text(lm, m, [codes for _, _, codes in items], base, batch_size)
                scores = attribute_accuracy(m, preds, texts)
                scores["by_split"] = {name: attribute_accuracy(m, [preds[i] for i in idx],
                                                               [texts[i] for i in idx])["score"]
                                      for name, idx in (("novel", novel), ("seen", seen)) if idx}
                results[f"{m}2text"] = {**scores, "examples": [{"reference": r, "prediction": p} for r, p in
                                                              zip(texts[:5], preds[:5])],
                                        "seconds": round(time.perf_counter() - t0, 1)}
            # text -> X
            t0 = time.perf_counter()
            refs, ref_attrs = _references(m, codecs[m], lm.layout, Path(tmp), shards_root)
            generated = answer_media(lm, m, texts, sampled, batch_size)
            # The target index only names the requested attributes: any reference with the same
            # attributes counts (reference_attributes), so per-attribute accuracy is what is scored.
            targets = [next(i for i, a in enumerate(ref_attrs) if a == parse_attributes(m, t)) for t in texts]
            gen_j, size_j = judge_codes(spec, generated)
            refs_j, _ = judge_codes(spec, refs)
            labels = [json.dumps(a, sort_keys=True) for a in ref_attrs]
            scores = nearest_reference_accuracy(gen_j, targets, refs_j, reference_attributes=ref_attrs,
                                                reference_labels=labels, codebook_size=size_j)
            # The judge's ceiling: the same judge on the items' own codes (held-out renderings, never
            # among the references) -- what a perfect generator of this codec's codes would score.
            true_j, _ = judge_codes(spec, [codes[: spec.num_codebooks] for _, _, codes in items])
            scores["judge_ceiling"] = nearest_reference_accuracy(
                true_j, targets, refs_j, reference_attributes=ref_attrs, reference_labels=labels,
                codebook_size=size_j)["score"]
            hits = _attribute_hits(scores, ref_attrs, [ref_attrs[t] for t in targets])
            scores["by_split"] = {name: float(np.mean([hits[i] for i in idx]))
                                  for name, idx in (("novel", novel), ("seen", seen)) if idx}
            results[f"text2{m}"] = {**scores, "empty_answers": sum(g.shape[-1] == 0 for g in generated),
                                    "seconds": round(time.perf_counter() - t0, 1)}
    return results


def summary_table(results: dict[str, Any]) -> str:
    """One line per direction: score, chance, ratio, the novel/seen split when known, and for text->X
    the judge's ceiling (the judge on the held-out items' own codes)."""
    lines = [f"{'direction':<13} {'score':>7} {'chance':>7} {'x chance':>9} {'novel':>7} {'seen':>7} {'ceiling':>8}"]
    for name, r in results.items():
        ratio = r["score"] / r["chance"] if r.get("chance") else math.nan
        split = r.get("by_split", {})
        cells = "".join(f" {split[k]:>7.3f}" if k in split else f" {'-':>7}" for k in ("novel", "seen"))
        cells += f" {r['judge_ceiling']:>8.3f}" if "judge_ceiling" in r else f" {'-':>8}"
        lines.append(f"{name:<13} {r['score']:>7.3f} {r['chance']:>7.3f} {ratio:>8.1f}x{cells}")
    return "\n".join(lines)


def score_demo(lm: Any, codecs: dict[str, Any], demo_dir: str | Path, n_items: int = HELD_OUT_ITEMS,
               sampling: Sequence[str] | None = None) -> tuple[dict[str, Any], str]:
    """The demo's scorer, as ``anygpt eval --demo DIR`` calls it (named in ``DIR/eval_suite.json``).

    Args:
        lm: the loaded model (:func:`anygpt.infer.loading.load_lm`).
        codecs: modality -> codec (:func:`anygpt.modalities.load_codecs` of the model's codecs).
        demo_dir: an ``anygpt demo`` output directory (its ``shards/``).
        n_items: held-out items per direction.
        sampling: ``MODE.FIELD=VALUE`` overrides of the text->X sampling (default :data:`SYNTHETIC_SAMPLING`).

    Returns:
        ``(results, table)``: per direction its scores (``score``, ``chance``, ``by_split``, ...) and
        :func:`summary_table` of them.
    """
    results = evaluate_synthetic(lm, codecs, Path(demo_dir) / "shards", n_items=n_items,
                                 sampling=SYNTHETIC_SAMPLING if sampling is None else sampling)
    return results, summary_table(results)


def write_eval_suite(demo_dir: str | Path) -> Path:
    """Write ``DIR/eval_suite.json`` naming :func:`score_demo` (``module:function``), the scorer
    ``anygpt eval --demo DIR`` imports by name."""
    path = Path(demo_dir) / EVAL_SUITE
    path.write_text(json.dumps({"scorer": f"{score_demo.__module__}:{score_demo.__qualname__}"}) + "\n",
                    encoding="utf-8")
    return path


__all__ = ["AttributeJudge", "score_demo", "evaluate_synthetic", "summary_table", "judge_codes", "shard_items", "write_eval_suite",
           "SYNTHETIC_SAMPLING", "EVAL_SUITE"]
