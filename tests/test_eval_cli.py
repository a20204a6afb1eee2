"""`anygpt eval` on held-out shards and the `anygpt bench` table helpers."""
import json
import math
import subprocess
import sys

import pytest
import torch

from anygpt.bench import machine, ratios


def test_eval_cli_reports_loss_per_task_and_modality(tmp_path):
    from anygpt.infer.testing import build_tiny_model_dir
    from anygpt.train.bench import synthetic_corpus

    model = build_tiny_model_dir(tmp_path / "m")
    shards = synthetic_corpus(tmp_path / "data", pairs=4, conversations=2, eval_pairs=6, tokenizer=False)
    out = tmp_path / "eval.json"
    proc = subprocess.run([sys.executable, "-m", "anygpt.cli", "eval", "--model", str(model), "--data",
                           shards["eval"], "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert math.isfinite(result["loss"]) and result["tokens"] > 0
    # A random model over an 18k vocabulary: every direction's loss is near log(vocab).
    tasks = result["loss_by_task"]
    assert {"image2text", "text2image"} <= set(tasks)
    for name, value in tasks.items():
        assert 3.0 < value < 15.0, (name, value)
    assert set(result["loss_by_modality"]) <= {"image", "speech", "music"} and result["loss_by_modality"]


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
    from anygpt.eval.run import shard_loss
    from anygpt.infer.loading import load_lm
    from anygpt.infer.testing import build_tiny_model_dir
    from anygpt.train.bench import synthetic_corpus

    lm = load_lm(build_tiny_model_dir(tmp_path / "m"), device="cpu")
    shards = synthetic_corpus(tmp_path / "data", pairs=2, conversations=2, eval_pairs=6, tokenizer=False)["eval"]
    ref = shard_loss(lm, shards, seq_len=256, batch_size=2, attention="mask4d")
    flex = shard_loss(lm, shards, seq_len=256, batch_size=2, attention="flex")
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


def test_eval_generate_scores_asr_captions_and_tts_through_an_asr_model(tmp_path):
    from anygpt.infer.testing import build_tiny_model_dir
    from anygpt.train.bench import synthetic_corpus

    model = build_tiny_model_dir(tmp_path / "m")
    shards = synthetic_corpus(tmp_path / "data", pairs=4, conversations=2, eval_pairs=6, tokenizer=False)
    (tmp_path / "data" / "eval" / "zz-broken.tar").write_bytes(b"not a tar archive" * 64)  # a corrupt shard
    out = tmp_path / "eval.json"
    proc = subprocess.run([sys.executable, "-m", "anygpt.cli", "eval", "--model", str(model), "--data",
                           shards["eval"], "--generate", "--items", "5", "--codecs", "tiny",
                           "--asr-model", str(_tiny_asr_dir(tmp_path / "asr")), "--out", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    gen = json.loads(out.read_text())["generate"]
    assert {"asr", "caption_image", "tts"} <= set(gen), set(gen)
    # A random LM and a random ASR model: the numbers are bad but real, over the items asked for.
    # 5 asked for, the 6 eval pairs hold 2 per modality: every shard is read, the broken one skipped.
    assert gen["asr"]["n"] == 2 and gen["asr"]["wer"] >= 0.5
    assert gen["caption_image"]["n"] >= 1 and 0.0 <= gen["caption_image"]["bleu1"] <= 1.0
    assert gen["tts"]["n"] == 2 and gen["tts"]["wer"] > 0 and math.isfinite(gen["tts"]["reference_wer"])
    assert "WER" in proc.stdout and "BLEU-4" in proc.stdout
    assert gen["skipped"]["corrupt_shards"] == 1 and "zz-broken.tar" in proc.stderr
    # Without an ASR model, tts is skipped with a note; a bad ASR directory is a one-line error.
    proc = subprocess.run([sys.executable, "-m", "anygpt.cli", "eval", "--model", str(model), "--data", shards["eval"],
                           "--generate", "--items", "2", "--tasks", "tts", "--codecs", "tiny",
                           "--asr-model", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.strip().count("\n") == 0 and "config.json" in proc.stderr


def test_eval_generate_skips_codes_that_do_not_fit_the_layout(tmp_path, capsys):
    import numpy as np

    from anygpt.eval.real import evaluate_real
    from anygpt.infer.loading import load_lm
    from anygpt.infer.testing import build_tiny_model_dir
    from anygpt.train.bench import pair_sample, write_shards

    rng = np.random.default_rng(0)
    good = pair_sample(rng, "good", "image")
    bad = pair_sample(rng, "bad", "image")
    bad["image.npy"] = bad["image.npy"].astype(np.int64) + 10**6  # another codec's ids: no prompt holds them
    write_shards(tmp_path / "s", "s", [bad, good], per_shard=8)
    lm = load_lm(build_tiny_model_dir(tmp_path / "m"), device="cpu")
    result = evaluate_real(lm, None, str(tmp_path / "s" / "*.tar"), items=5, tasks=("caption",))
    assert result["caption_image"]["n"] == 1 and result["skipped"]["bad_codes"] == 1
    assert "bad: image codes" in capsys.readouterr().err
