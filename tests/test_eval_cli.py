"""`anygpt eval` on held-out shards and the `anygpt bench` table helpers."""
import json
import math
import subprocess
import sys

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


def test_eval_cli_missing_model_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "anygpt.cli", "eval", "--model", str(tmp_path / "none"),
                           "--data", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.strip().count("\n") == 0 and "none" in proc.stderr


def test_bench_ratios_and_machine():
    found = ratios({"a": {"speedup": 2.0, "x": 5}, "rows": [{"real_time_factor": 3.0}], "ratio": 1.5, "flag": True})
    assert found == {"a.speedup": 2.0, "rows[0].real_time_factor": 3.0, "ratio": 1.5}
    info = machine()
    assert info["cpus"] >= 1 and info["packages"]["torch"]
