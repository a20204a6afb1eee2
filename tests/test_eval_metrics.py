"""Eval's metrics (WER, BLEU, the judges of generated codes, with their chance levels), the layering that
keeps them below the demo, and the demo's grammar-based X->text scores built on them."""
from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from anygpt import modalities as registry
from anygpt.demo.grammar import all_combinations, attribute_values, demo_modalities, describe
from anygpt.demo.scoring import attribute_accuracy, chance_levels
from anygpt.eval.metrics import (
    asr_wer,
    bleu,
    caption_metrics,
    classifier_attribute_accuracy,
    code_features,
    edit_distance,
    nearest_reference_accuracy,
    normalize_text,
)


def _imported(code: str) -> list[str]:
    """Modules (of anygpt and a few heavy libraries) that ``code`` leaves in ``sys.modules``, fresh process."""
    probe = (f"{code}\nimport sys\nprint('\\n'.join(sorted(m for m in sys.modules if m.startswith('anygpt') "
             "or m in ('torch', 'jiwer', 'sklearn', 'PIL', 'soundfile', 'transformers'))))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    return out.split()


def test_metrics_depend_on_nothing_above_them():
    # light (jiwer / scikit-learn only inside the functions that need them) and no other project module
    assert _imported("import anygpt.eval.metrics") == ["anygpt", "anygpt.eval", "anygpt.eval.metrics"]


def test_no_eval_module_imports_the_demo():
    code = ("import pkgutil, importlib, anygpt.eval\n"
            "names = [m.name for m in pkgutil.iter_modules(anygpt.eval.__path__, 'anygpt.eval.')]\n"
            "assert {'anygpt.eval.metrics', 'anygpt.eval.run'} <= set(names), names\n"
            "for name in names:\n"
            "    importlib.import_module(name)")
    loaded = _imported(code)
    assert "anygpt.eval.run" in loaded and "anygpt.eval.metrics" in loaded
    assert [m for m in loaded if m.startswith("anygpt.demo")] == []


def test_chance_levels_from_grammar():
    c = chance_levels("image")
    assert c["chance_per_attribute"] == pytest.approx({"shape": 1 / 3, "colour": 1 / 4, "position": 1 / 4})
    assert c["chance_exact"] == pytest.approx(1 / 48)
    assert c["chance_mean_attribute"] == pytest.approx((1 / 3 + 1 / 4 + 1 / 4) / 3)
    assert chance_levels("speech")["chance_exact"] == pytest.approx(1 / 60)
    assert chance_levels("music")["chance_exact"] == pytest.approx(1 / 12)


@pytest.mark.parametrize("modality", demo_modalities())
def test_attribute_accuracy_perfect_and_random(modality):
    rng = np.random.default_rng(0)
    combos = all_combinations(modality)
    refs = [describe(modality, combos[i]) for i in rng.integers(len(combos), size=1500)]
    perfect = attribute_accuracy(modality, [r.upper() + "." for r in refs], refs)
    assert perfect["exact"] == perfect["mean_attribute"] == perfect["score"] == 1.0
    assert perfect["exact_string"] == 1.0 and perfect["unparsed"] == 0
    assert all(v == 1.0 for v in perfect["per_attribute"].values())

    preds = [describe(modality, combos[i]) for i in rng.integers(len(combos), size=len(refs))]
    rand = attribute_accuracy(modality, preds, refs)
    assert rand["score"] == rand["mean_attribute"] and rand["chance"] == rand["chance_mean_attribute"]
    # loose bounds: 1500 items, standard error of a per-attribute accuracy <= 0.013
    assert abs(rand["mean_attribute"] - rand["chance_mean_attribute"]) < 0.05
    for a, acc in rand["per_attribute"].items():
        assert abs(acc - rand["chance_per_attribute"][a]) < 0.06, a
    assert abs(rand["exact"] - rand["chance_exact"]) < 0.04
    if registry.get(modality).text_kind == "transcript":  # speech
        assert perfect["wer"] == 0.0
        assert abs(rand["wer"] - rand["chance_wer"]) < 0.05  # chance WER = expected WER of a random sentence
    else:
        assert "wer" not in rand


def test_attribute_accuracy_partial_and_unparsed():
    refs = ["a red circle on the left", "a blue square at the top"]
    r = attribute_accuracy("image", ["a red square on the left", "nothing useful"], refs)
    assert r["per_attribute"] == {"shape": 0.0, "colour": 0.5, "position": 0.5}
    assert r["exact"] == 0.0 and r["unparsed"] == 1
    with pytest.raises(ValueError):
        attribute_accuracy("image", ["x"], refs)
    with pytest.raises(ValueError, match="does not name"):
        attribute_accuracy("image", ["x"], ["a red thing"])


def _class_codes(rng, profile, t, k=1, noise=0.1, v=64):
    """Codes drawn mostly from a class's preferred codes, with some uniform noise."""
    rows = []
    for _ in range(k):
        own = rng.choice(profile, size=t)
        rnd = rng.integers(v, size=t)
        rows.append(np.where(rng.random(t) < noise, rnd, own))
    return np.stack(rows)


def test_nearest_reference_on_synthetic_codes():
    rng = np.random.default_rng(0)
    v, combos = 64, all_combinations("music")  # 12 classes
    profiles = [rng.choice(v, size=6, replace=False) for _ in combos]
    refs = [_class_codes(rng, p, 60, k=4, v=v) for p in profiles]
    targets = rng.integers(len(combos), size=240).tolist()
    gen = [_class_codes(rng, profiles[t], int(rng.integers(20, 120)), k=4, v=v) for t in targets]  # any length
    r = nearest_reference_accuracy(gen, targets, refs, reference_attributes=combos, codebook_size=v)
    assert r["accuracy"] > 0.95 and r["mean_attribute"] > 0.95
    assert r["chance_accuracy"] == pytest.approx(1 / 12)
    assert r["chance_per_attribute"] == pytest.approx({"tempo": 1 / 2, "scale": 1 / 2, "timbre": 1 / 3})
    assert r["chance_exact_attributes"] == pytest.approx(1 / 12)
    assert r["score"] == r["mean_attribute"] and r["chance"] == r["chance_mean_attribute"]

    noise = [rng.integers(v, size=(4, 60)) for _ in targets]
    rr = nearest_reference_accuracy(noise, targets, refs, reference_attributes=combos, codebook_size=v)
    assert rr["accuracy"] < 0.2  # ~1/12 expected
    assert abs(rr["mean_attribute"] - rr["chance_mean_attribute"]) < 0.12

    # speech-like: references keep 8 RVQ layers, generations only layer 1; bigrams on; one empty generation
    refs8 = [_class_codes(rng, p, 50, k=8, v=v) for p in profiles]
    gen1 = [_class_codes(rng, profiles[t], 40, k=1, v=v) for t in targets[:30]] + [np.zeros((1, 0), np.int64)]
    r1 = nearest_reference_accuracy(gen1, targets[:31], refs8, bigrams=True)
    assert r1["empty"] == 1 and r1["predictions"][-1] == -1
    assert r1["accuracy"] >= 0.9 * 30 / 31 and "mean_attribute" not in r1


def test_nearest_reference_counts_only_used_symbols_with_the_same_result():
    """The judge renumbers codes to the symbols that occur (a per-slot image judge has 262k bins);
    its nearest references are those of the dense cosine, computed here by hand, and codes outside
    the codebook are ignored as before."""
    from anygpt.eval.metrics import code_features

    rng = np.random.default_rng(1)
    v = 5000
    refs = [rng.choice(rng.integers(v, size=40), size=(2, 30)) for _ in range(25)]
    gen = [np.where(rng.random((2, 24)) < 0.1, v + 7, r[:, :24]) for r in refs for _ in range(2)]  # 10% out of range
    r = nearest_reference_accuracy(gen, list(range(25)) * 2, refs, codebook_size=v)
    dense = code_features(gen, v, 2) @ code_features(refs, v, 2).T
    assert r["predictions"] == dense.argmax(axis=1).tolist()


def test_nearest_reference_labels_and_validation():
    refs = [np.array([[0, 0, 1]]), np.array([[0, 0, 1]]), np.array([[5, 5, 6]])]
    # two renderings share label "a": a generation matching either is right; chance = 2/3 for label a
    r = nearest_reference_accuracy([np.array([0, 1, 1])], [1], refs, reference_labels=["a", "a", "b"])
    assert r["accuracy"] == 1.0 and r["chance_accuracy"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        nearest_reference_accuracy([np.array([0])], [3], refs)
    with pytest.raises(ValueError):
        nearest_reference_accuracy([np.array([0])], [0, 1], refs)
    f = code_features([np.array([[1, 1, 2]]), np.array([[1, 2, 2, 2, 1, 1]])], codebook_size=4)
    assert f.shape == (2, 4) and np.allclose(np.linalg.norm(f, axis=1), 1.0)
    assert f[0] @ f[1] == pytest.approx(1.0 * (2 * 3 + 1 * 3) / (math.sqrt(5) * math.sqrt(18)))


def test_classifier_attribute_accuracy():
    rng = np.random.default_rng(1)
    v, combos = 48, all_combinations("music")
    # each attribute value owns a few codes, so the classifier can generalise to unseen combinations
    owned = {(a, val): rng.choice(v, size=3, replace=False) for a, vals in attribute_values("music").items()
             for val in vals}

    def sample(c, t=60):
        profile = np.concatenate([owned[(a, c[a])] for a in c])
        return _class_codes(rng, profile, t, k=2, v=v)

    train = [c for c in combos for _ in range(8)]
    test = [combos[i] for i in rng.integers(len(combos), size=60)]
    r = classifier_attribute_accuracy([sample(c) for c in test], test, [sample(c) for c in train], train)
    assert r["mean_attribute"] > 0.9 and r["chance_mean_attribute"] == pytest.approx((1 / 2 + 1 / 2 + 1 / 3) / 3)
    assert r["chance_exact_attributes"] == pytest.approx(1 / 12)


def test_normalize_and_asr_wer():
    assert normalize_text("  Hello, World!  It's 5 o'clock.") == "hello world it's 5 o'clock"
    assert edit_distance("a b c".split(), "a x c d".split()) == 2 and edit_distance([], ["a"]) == 1
    r = asr_wer(["Hello, World!", "the cat sat", "x"], ["hello world", "the cat sat down", "  ...  "])
    assert r["n"] == 2 and r["skipped_empty_refs"] == 1
    assert r["deletions"] == 1 and r["ref_words"] == 6 and r["wer"] == pytest.approx(1 / 6)
    assert asr_wer(["a b"], ["a b"])["wer"] == 0.0
    assert math.isnan(asr_wer([], [])["wer"])


def test_bleu_and_caption_metrics():
    b = bleu(["the cat sat on the mat"], [["the cat is on the mat", "there is a cat on the mat"]])
    assert b["bleu1"] == pytest.approx(5 / 6)
    assert b["bleu2"] == pytest.approx(math.sqrt(5 / 6 * 3 / 5))
    assert b["bleu3"] == pytest.approx((5 / 6 * 3 / 5 * 1 / 4) ** (1 / 3))
    assert b["bleu4"] == 0.0 and b["brevity_penalty"] == 1.0
    short = bleu(["the cat"], ["the cat sat on the mat"])
    assert short["brevity_penalty"] == pytest.approx(math.exp(1 - 6 / 2))
    m = caption_metrics(["A red circle on the left.", "a blue square"],
                        ["a red circle on the left", ["a blue square at the top", "a blue square"]])
    assert m["exact_match"] == 1.0 and m["bleu4"] == pytest.approx(1.0) and m["n"] == 2
    assert caption_metrics(["x y z"], ["a b c"])["bleu1"] == 0.0
