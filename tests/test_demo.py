"""The README's main job, shortened (`anygpt demo --quick`): structure of the report and learning; and the
demo's evaluation pieces on their own (judging per slot, reading test shards, the scorer eval finds)."""
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anygpt import modalities as registry
from anygpt.data.schema import MediaItem, encode_sample
from anygpt.demo.corpus import MEDIA
from anygpt.demo.evaluate import EVAL_SUITE, judge_codes, score_demo, shard_items, summary_table, write_eval_suite
from anygpt.demo.grammar import GRAMMARS, demo_modalities
from anygpt.eval.metrics import nearest_reference_accuracy
from anygpt.layout import ModalitySpec
from data_pipeline.shards import ChunkWriter, atomic_write_text, sidecar_path

MODALITIES = demo_modalities()
DIRECTIONS = tuple(d for m in MODALITIES for d in (f"{m}2text", f"text2{m}"))
# The directions the quick demo learns within its budget (measured: image2text 2.2x chance, speech2text
# 1.9x, music2text 1.6x; text->X 0.8-1.6x at quick size; the full demo is measured in the README/report).
# These are CI's "easiest directions beat chance" check, with a margin.
EASIEST = tuple(f"{m}2text" for m in MODALITIES)
MARGIN = 1.25
TOY_PLUGIN = Path(__file__).parent / "toy_modality.py"


def test_demo_modalities_are_the_registered_ones_with_content():
    assert set(GRAMMARS) == set(MEDIA)  # every grammar can be rendered, and nothing else
    code = ("import json; from anygpt import modalities as r; from anygpt.demo.grammar import demo_modalities; "
            "print(json.dumps([list(r.names()), list(demo_modalities())]))")
    env = {**os.environ, "ANYGPT_PLUGINS": str(TOY_PLUGIN)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    names, demo = json.loads(out.stdout)
    assert "toy" in names and "toy" not in demo  # a registered modality without demo content is left out
    assert demo == [n for n in names if n in GRAMMARS] == list(MODALITIES)  # registry order


def _spec(span_length):
    return ModalitySpec("m", offset=100, num_codebooks=1, codebook_size=4, start="<a>", end="<b>", prefix="x",
                        span_length=span_length)


def test_judge_codes_per_slot_for_fixed_span_length():
    # Two references with the same bag of codes in different slots; the generation matches the second.
    refs = [np.array([[0, 1, 2]]), np.array([[1, 2, 0]])]
    gen = [np.array([[1, 2, 0]])]
    fixed = _spec(3)
    gen_j, size = judge_codes(fixed, gen)
    assert size == 12 and gen_j[0].tolist() == [[1, 2 + 4, 0 + 8]]
    refs_j, _ = judge_codes(fixed, refs)
    assert nearest_reference_accuracy(gen_j, [1], refs_j, codebook_size=size)["accuracy"] == 1.0
    # Without a fixed span length codes stay a bag per codebook: both references tie, the first wins.
    free = _spec(None)
    same, size = judge_codes(free, gen)
    assert size == 4 and same[0] is gen[0]
    assert nearest_reference_accuracy(same, [1], judge_codes(free, refs)[0], codebook_size=size)["accuracy"] == 0.0


def test_attribute_judge_soft_score_is_the_expected_hits_under_a_softmax_of_similarities():
    from types import SimpleNamespace

    from anygpt.demo.evaluate import AttributeJudge

    # Three speech references (bag of codes over 4 codes); the answer's codes are those of the first.
    codes = [np.array([[0, 0, 1]]), np.array([[2, 2, 3]]), np.array([[0, 2, 3]])]
    attrs = [{"number": "two", "colour": "red", "shape": "circle"},
             {"number": "two", "colour": "blue", "shape": "square"},
             {"number": "one", "colour": "blue", "shape": "square"}]
    index = {c: c for c in range(4)}
    judge = AttributeJudge.__new__(AttributeJudge)  # references given here, not rendered from a demo
    judge.layout = SimpleNamespace(modality=lambda m: _spec(None))
    judge._refs = {"speech": (np.stack([AttributeJudge._features(c, index) for c in codes]), index, attrs)}
    text, answer = "two red circles", codes[0]
    hits = np.array([3, 1, 0]) / 3  # the fraction of the asked-for attributes each reference has
    assert judge.score("speech", [text], [answer]) == [1.0]  # the evaluation's nearest reference
    sims = np.stack([AttributeJudge._features(c, index) for c in codes]).reshape(3, -1) @ \
        AttributeJudge._features(answer, index).reshape(-1)
    for t in (0.05, 0.5, 5.0):
        w = np.exp(sims / t) / np.exp(sims / t).sum()
        assert judge.score("speech", [text], [answer], temperature=t)[0] == pytest.approx(float(w @ hits))
    soft = [judge.score("speech", [text], [answer], temperature=t)[0] for t in (1e-3, 0.3, 1e3)]
    assert soft[0] == pytest.approx(1.0) and soft[0] > soft[1] > soft[2] == pytest.approx(hits.mean(), abs=1e-3)
    assert judge.score("speech", [text, text], [None, np.zeros((1, 0), dtype=np.int64)], temperature=0.5) == [0.0, 0.0]


def _write_chunk(out: Path, chunk: int, rows: list[tuple[str, str, np.ndarray]]) -> None:
    writer = ChunkWriter(out, "image", chunk)
    for key, text, codes in rows:
        k, files, _ = encode_sample(id=key, kind="pair", media=[MediaItem("image", codes, 16)], source="manifest",
                                    text=text)
        writer.add(k, files)
    rec = {"format": 1, "chunk": chunk, "prefix": "image", "parts": writer.close()}
    atomic_write_text(sidecar_path(out, "image", chunk), json.dumps(rec) + "\n")


def test_shard_items_in_manifest_order(tmp_path):
    rows = [(f"image-test-{s}-{i:05d}", f"caption {s} {i}", np.full((1, 4), i, dtype=np.int64))
            for s, i in (("novel", 0), ("novel", 1), ("seen", 2))]
    _write_chunk(tmp_path, 1, rows[2:])  # written out of order: the chunk records give the order
    _write_chunk(tmp_path, 0, rows[:2])
    got = shard_items(tmp_path, "image", 10)
    assert [(k, t) for k, t, _ in got] == [(k, t) for k, t, _ in rows]
    assert all(np.array_equal(c, want) for (_, _, c), (_, _, want) in zip(got, rows))
    assert [k for k, _, _ in shard_items(tmp_path, "image", 2)] == [rows[0][0], rows[1][0]]


def test_eval_suite_names_the_scorer(tmp_path):
    path = write_eval_suite(tmp_path)
    assert path == tmp_path / EVAL_SUITE
    spec = json.loads(path.read_text())["scorer"]
    assert spec == "anygpt.demo.evaluate:score_demo"
    module, _, name = spec.partition(":")
    assert getattr(importlib.import_module(module), name) is score_demo


def test_summary_table():
    table = summary_table({"image2text": {"score": 0.5, "chance": 0.25, "by_split": {"novel": 0.4}},
                           "text2image": {"score": 0.3, "chance": 0.3, "judge_ceiling": 0.9}})
    lines = table.splitlines()
    assert lines[0].split() == ["direction", "score", "chance", "x", "chance", "novel", "seen", "ceiling"]
    assert lines[1].split() == ["image2text", "0.500", "0.250", "2.0x", "0.400", "-", "-"]
    assert lines[2].split() == ["text2image", "0.300", "0.300", "1.0x", "-", "-", "0.900"]


def test_alignment_summary_pairs_seeds_and_compares_the_gain_with_the_spread(tmp_path):
    from anygpt.demo.run import summarise_alignment

    config = tmp_path / "align.yaml"
    config.write_text("run: {max_steps: 8}\nalign: {method: dpo}\n")
    before = {0: {"text2speech": 0.4, "text2image": 0.6}, 1: {"text2speech": 0.6, "text2image": 0.6}}
    after = {0: {"text2speech": 0.5, "text2image": 0.7}, 1: {"text2speech": 0.6, "text2image": 0.8}}
    a = summarise_alignment(config, before, after, tmp_path)
    # seed means before 0.5 / 0.6, after 0.6 / 0.7: each seed gains 0.1; spread (std over seeds) 0.05 both
    assert a["before"]["mean"] == pytest.approx(0.55) and a["after"]["mean"] == pytest.approx(0.65)
    assert a["gain_by_seed"] == {"0": pytest.approx(0.1), "1": pytest.approx(0.1)}
    assert a["gain_spread"] == pytest.approx(0.0, abs=1e-12)
    assert a["spread"]["before"]["mean"] == pytest.approx(0.05) and a["spread"]["after"]["text2image"] == pytest.approx(0.05)
    assert a["beyond_spread"] is True and a["steps"] == 8
    # a gain smaller than the spread is not claimed
    wide = {0: {"text2speech": 0.3, "text2image": 0.3}, 1: {"text2speech": 0.9, "text2image": 0.9}}
    assert summarise_alignment(config, wide, {s: {k: v + 0.1 for k, v in r.items()} for s, r in wide.items()},
                               tmp_path)["beyond_spread"] is False


@pytest.mark.slow
@pytest.mark.distributed
def test_quick_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "anygpt.cli", "demo", "--out", str(out), "--quick"],
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "anygpt chat --model" in proc.stdout
    # `anygpt eval --demo DIR` finds the demo's scorer by this name
    assert json.loads((out / EVAL_SUITE).read_text()) == {"scorer": "anygpt.demo.evaluate:score_demo"}
    report = json.loads((out / "report.json").read_text())
    assert set(report["directions"]) == set(DIRECTIONS)
    for name, r in report["directions"].items():
        assert 0.0 <= r["score"] <= 1.0 and 0.0 < r["chance"] < 1.0, name
        assert set(r["by_split"]) == {"novel", "seen"}, name
    for name in DIRECTIONS[1::2]:  # text->X: the judge itself tells the attributes apart on true codes
        r = report["directions"][name]
        assert r["chance"] < r["judge_ceiling"] <= 1.0, (name, r["judge_ceiling"], r["chance"])
    for name in EASIEST:
        r = report["directions"][name]
        assert r["score"] > MARGIN * r["chance"], (name, r["score"], r["chance"])
    for m in MODALITIES:
        assert all(c["used"] > 1 for c in report["codebooks"][m]["codebooks"]), m
        assert report["shards"][f"train_{m}"]["written"] > 0
    for png in report["loss_curves"].values():
        Image.open(png).verify()
    assert "x chance" in (out / "report.md").read_text()
    # the alignment stage: its YAML beside the stage ones, before/after on the same text->X directions
    a = report["alignment"]
    assert (out / "configs" / "align.yaml").is_file() and a["config"] == str(out / "configs" / "align.yaml")
    text2x = {d for d in DIRECTIONS if d.startswith("text2")}
    assert set(a["before"]) == set(a["after"]) == text2x | {"mean"}
    assert all(a["before"][d] == report["directions"][d]["score"] for d in text2x)  # seed 0 = the eval's
    assert all(0.0 <= a["after"][d] <= 1.0 for d in text2x)
    assert set(a["gain_by_seed"]) == set(a["by_seed"]["before"]) == {str(s) for s in a["seeds"]}
    Image.open(a["reward_curve"]).verify()
    assert "## Alignment" in (out / "report.md").read_text()
    from anygpt.train.metrics import read_jsonl

    assert [r["step"] for r in read_jsonl(out / "runs" / "align" / "metrics.jsonl")][-1] == a["steps"]
    files = [Path(f) for s in report["samples"] for f in s["files"]]
    assert {f.suffix for f in files} == {registry.get(m).output_suffix for m in MODALITIES}
    import soundfile

    for f in files:
        if f.suffix == ".wav":
            assert soundfile.info(str(f)).frames > 0
        else:
            Image.open(f).verify()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert model.config.vocab_size == json.loads((out / "model" / "vocab_layout.json").read_text())["total"]
