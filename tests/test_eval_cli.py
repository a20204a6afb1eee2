"""`anygpt eval` on held-out shards (the one held-out loss, a demo's named scorer, the real-data
harness) and the `anygpt bench` table helpers."""
import json
import math
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

import pytest
import torch

from anygpt.bench import machine, ratios

SCORER_CALLS = []


def _fake_scorer(lm, codecs, demo_dir, n_items, sampling):
    """A demo scorer (what `anygpt.demo.evaluate:score_demo` is for the real demo), named by path below."""
    SCORER_CALLS.append({"codecs": sorted(codecs), "demo_dir": str(demo_dir), "n_items": n_items,
                         "sampling": sampling, "layout": sorted(lm.layout.modalities)})
    return {"image2text": {"score": 0.5, "chance": 0.25}}, "direction  score\nimage2text 0.500"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from anygpt.infer.testing import build_tiny_model_dir

    return build_tiny_model_dir(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def eval_shards(tmp_path_factory):
    from anygpt.train.bench import synthetic_corpus

    return synthetic_corpus(tmp_path_factory.mktemp("data"), pairs=4, conversations=2, eval_pairs=6, tokenizer=False)


def test_eval_cli_reports_loss_per_task_and_modality(tmp_path, tiny_model, eval_shards):
    out = tmp_path / "eval.json"
    proc = subprocess.run([sys.executable, "-m", "anygpt.cli", "eval", "--model", str(tiny_model), "--data",
                           eval_shards["eval"], "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert math.isfinite(result["loss"]) and result["tokens"] > 0
    # A random model over an 18k vocabulary: every direction's loss is near log(vocab).
    tasks = result["loss_by_task"]
    assert {"image2text", "text2image", "speech2text", "text2speech"} <= set(tasks)
    for name, value in tasks.items():
        assert 3.0 < value < 15.0, (name, value)
    # by the kind of target token, as in training: X->text answers are text, text->X answers media
    assert {"text", "image", "speech", "music"} == set(result["loss_by_modality"])
    assert result["read"]["examples"] == 12 and result["read"]["lost_samples"] == 0


def test_heldout_loss_is_the_full_logits_loss_grouped_by_task_and_target(tiny_model, eval_shards):
    """heldout_loss (LM head only at the targets) == cross-entropy over full logits, grouped by the
    batch's task ids and by the kind of the target token."""
    from anygpt.config import DataConfig, SourceConfig, TrainConfig
    from anygpt.data import build_eval_loader, task_names
    from anygpt.eval.loss import heldout_loss
    from anygpt.infer.loading import load_lm

    lm = load_lm(tiny_model, device="cpu")
    shards = eval_shards["eval"]
    cfg = TrainConfig(data=DataConfig(sources=[SourceConfig(name="eval", shards=shards)], eval_shards=shards))
    loader = build_eval_loader(cfg, lm.tokenizer, lm.layout, batch_size=8)
    got = heldout_loss(lm.model, loader, lm.layout, lm.device)
    sums, counts = {}, {}
    with torch.no_grad():
        for batch in loader:
            logits = lm.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                              attention_mask=batch["attention_mask"]).logits[:, :-1]
            labels, tasks = batch["labels"][:, 1:], batch["tasks"][:, 1:]
            valid = labels != -100
            nll = torch.nn.functional.cross_entropy(logits[valid].float(), labels[valid], reduction="none")
            for x, target, task in zip(nll.tolist(), labels[valid].tolist(), tasks[valid].tolist()):
                for key in ("task:" + task_names()[task], "mod:" + (lm.layout.modality_of_id(target) or "text")):
                    sums[key] = sums.get(key, 0.0) + x
                    counts[key] = counts.get(key, 0) + 1
    total = sum(v for k, v in sums.items() if k.startswith("task:"))
    n = sum(v for k, v in counts.items() if k.startswith("task:"))
    assert got["tokens"] == n and got["loss"] == pytest.approx(total / n, rel=1e-5)
    assert got["loss_by_task"] == pytest.approx({k[5:]: sums[k] / counts[k] for k in sums if k.startswith("task:")},
                                                rel=1e-5)
    assert got["loss_by_modality"] == pytest.approx(
        {k[4:]: sums[k] / counts[k] for k in sums if k.startswith("mod:")}, rel=1e-5)
    assert lm.model.training is False


def test_eval_demo_calls_the_scorer_the_demo_dir_names(tmp_path, tiny_model, eval_shards, capsys):
    from anygpt.cli import main

    demo = tmp_path / "demo"
    demo.mkdir()
    (demo / "eval_suite.json").write_text(json.dumps({"scorer": f"{__name__}:_fake_scorer"}))
    out = tmp_path / "x.json"
    SCORER_CALLS.clear()
    rc = main(["eval", "--model", str(tiny_model), "--data", eval_shards["eval"], "--demo", str(demo),
               "--codecs", "tiny", "--items", "3", "--set", "all.temperature=0.5", "--out", str(out)])
    assert rc == 0
    assert SCORER_CALLS == [{"codecs": ["image", "music", "speech"], "demo_dir": str(demo), "n_items": 3,
                             "sampling": ["all.temperature=0.5"], "layout": ["image", "music", "speech"]}]
    result = json.loads(out.read_text())
    assert result["directions"] == {"image2text": {"score": 0.5, "chance": 0.25}} and math.isfinite(result["loss"])
    assert "image2text 0.500" in capsys.readouterr().out
    # no eval_suite.json / a scorer that does not import: one line, before the model is loaded
    (demo / "eval_suite.json").unlink()
    assert main(["eval", "--model", str(tmp_path / "no-model"), "--data", eval_shards["eval"],
                 "--demo", str(demo)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "eval_suite.json" in err and str(demo) in err
    (demo / "eval_suite.json").write_text(json.dumps({"scorer": "no_such_module:score"}))
    assert main(["eval", "--model", str(tmp_path / "no-model"), "--data", eval_shards["eval"],
                 "--demo", str(demo)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no_such_module:score" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="flash_varlen may run on this machine")
def test_eval_attention_path_cannot_run_here_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "anygpt.cli", "eval", "--model", str(tmp_path / "none"),
                           "--data", str(tmp_path), "--attention", "flash_varlen"], capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("error: --attention: flash_varlen needs a CUDA GPU")


@pytest.mark.slow
def test_eval_loss_through_flex_equals_the_4d_mask(tmp_path):
    """`anygpt eval --attention flex` (forward only, so it runs on CPU too) gives mask4d's held-out loss."""
    from anygpt.eval.loss import shards_heldout_loss
    from anygpt.infer.loading import load_lm
    from anygpt.infer.testing import build_tiny_model_dir
    from anygpt.train.bench import synthetic_corpus

    lm = load_lm(build_tiny_model_dir(tmp_path / "m"), device="cpu")
    shards = synthetic_corpus(tmp_path / "data", pairs=2, conversations=2, eval_pairs=6, tokenizer=False)["eval"]
    ref = shards_heldout_loss(lm, shards, seq_len=256, batch_size=2, attention="mask4d")
    flex = shards_heldout_loss(lm, shards, seq_len=256, batch_size=2, attention="flex")
    assert ref["attention"] == "mask4d" and flex["attention"] == "flex" and ref["tokens"] == flex["tokens"] > 0
    assert abs(flex["loss"] - ref["loss"]) < 1e-5
    for task, value in ref["loss_by_task"].items():
        assert abs(flex["loss_by_task"][task] - value) < 1e-5, task
    assert lm.model.config._attn_implementation == "sdpa"  # generation afterwards runs as before


def test_eval_cli_missing_model_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "anygpt.cli", "eval", "--model", str(tmp_path / "none"),
                           "--data", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.strip().count("\n") == 0 and "none" in proc.stderr


def test_bench_ratios_and_machine():
    found = ratios({"a": {"speedup": 2.0, "x": 5}, "rows": [{"real_time_factor": 3.0}], "ratio": 1.5, "flag": True})
    assert found == {"a.speedup": 2.0, "rows[0].real_time_factor": 3.0, "ratio": 1.5}
    info = machine()
    assert info["cpus"] >= 1 and info["packages"]["torch"]


def _tiny_asr_dir(path):
    """A random wav2vec 2.0 CTC model with its tokenizer and feature extractor, saved like a real one."""
    from transformers import (Wav2Vec2Config, Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor,
                              Wav2Vec2ForCTC)

    path.mkdir(parents=True)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "|": 4, **{c: 5 + i for i, c in enumerate("abcdefghijklmnopqrstuvwxyz'")}}
    (path / "vocab.json").write_text(json.dumps(vocab))
    Wav2Vec2CTCTokenizer(str(path / "vocab.json")).save_pretrained(path)
    Wav2Vec2FeatureExtractor(sampling_rate=16000).save_pretrained(path)
    cfg = Wav2Vec2Config(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=37, conv_dim=(32, 32), conv_kernel=(10, 3), conv_stride=(5, 2),
                         num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, do_stable_layer_norm=True,
                         feat_extract_norm="layer", pad_token_id=0)
    Wav2Vec2ForCTC(cfg).save_pretrained(path)
    return path


def test_eval_generate_scores_asr_captions_and_tts_through_an_asr_model(tmp_path, tiny_model, eval_shards):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(Path(eval_shards["eval"]).parent, data)
    (data / "zz-broken.tar").write_bytes(b"not a tar archive" * 64)  # a corrupt shard
    out = tmp_path / "eval.json"
    proc = subprocess.run([sys.executable, "-m", "anygpt.cli", "eval", "--model", str(tiny_model), "--data",
                           str(data / "*.tar"), "--generate", "--items", "5", "--codecs", "tiny",
                           "--asr-model", str(_tiny_asr_dir(tmp_path / "asr")), "--out", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    gen = json.loads(out.read_text())["generate"]
    # which tasks run follows from the plugins: speech is transcribed, image and music are captioned
    assert {"asr_speech", "tts_speech", "caption_image", "caption_music"} == {k for k in gen if "_" in k
                                                                                and k not in ("bad_shards", "lost_samples")}
    # A random LM and a random ASR model: the numbers are bad but real, over the items asked for.
    # 5 asked for, the 6 eval pairs hold 2 per modality: every shard is read, the broken one named.
    assert gen["asr_speech"]["n"] == 2 and gen["asr_speech"]["wer"] >= 0.5
    assert gen["caption_image"]["n"] == 2 and 0.0 <= gen["caption_image"]["bleu1"] <= 1.0
    assert gen["tts_speech"]["n"] == 2 and gen["tts_speech"]["wer"] > 0
    assert math.isfinite(gen["tts_speech"]["reference_wer"])
    assert "WER" in proc.stdout and "BLEU-4" in proc.stdout
    assert list(gen["bad_shards"]) == [str(data / "zz-broken.tar")] and "zz-broken.tar" in proc.stderr
    # Without an ASR model, tts is skipped with a note; a bad ASR directory is a one-line error.
    proc = subprocess.run([sys.executable, "-m", "anygpt.cli", "eval", "--model", str(tiny_model), "--data",
                           eval_shards["eval"], "--generate", "--items", "2", "--tasks", "tts", "--codecs", "tiny",
                           "--asr-model", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.strip().count("\n") == 0 and "config.json" in proc.stderr


def test_eval_generate_skips_codes_that_do_not_fit_the_layout_and_counts_damaged_shards(tmp_path, tiny_model,
                                                                                         capsys):
    from anygpt.data.bench import write_samples
    from anygpt.data.schema import MediaItem, encode_sample
    from anygpt.eval.real import evaluate_real
    from anygpt.infer.loading import load_lm

    rng = np.random.default_rng(0)

    def image(key, codes):
        return encode_sample(id=key, kind="pair", source="test", text="a red circle",
                             media=[MediaItem("image", codes, 8192)])

    bad = image("bad", rng.integers(0, 8192, (1, 32)) + 10**5)  # another codec's ids: no prompt holds them
    good = [image(f"good{i}", rng.integers(0, 8192, (1, 32))) for i in range(4)]
    write_samples(tmp_path / "s", "s", [bad, *good], per_shard=8)
    shard = tmp_path / "s" / "s-000000.tar"
    with tarfile.open(shard) as tf:
        cut = tf.getmember("good3.json").offset
    shard.write_bytes(shard.read_bytes()[:cut])  # truncated: good3 is gone, and good2 (the tar's end is
    # missing, so its last sample cannot be known complete) is not delivered either
    lm = load_lm(tiny_model, device="cpu")
    result = evaluate_real(lm, None, str(tmp_path / "s" / "*.tar"), items=5, tasks=("caption",))
    assert result["caption_image"]["n"] == 2 and result["skipped"] == {"codes_out_of_range": 1}
    assert result["lost_samples"] == 2 and list(result["bad_shards"]) == [str(shard)]
    err = capsys.readouterr().err
    assert "bad: codes_out_of_range: image.npy: codes in" in err and "s-000000.tar" in err and "2 of 5 samples lost" in err
