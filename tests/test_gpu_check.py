"""`anygpt bench gpu`: the dry run end to end on CPU (same code, tiny sizes), the torch-AdamW engine, the
peak-FLOPs table and MFU, and installs from a wheel folder that never replace the node's torch."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from anygpt import gpu_check

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_dry_run_end_to_end(tmp_path):
    from anygpt.attention import unavailable

    out = tmp_path / "gpu.json"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "anygpt.gpu_check", "--dry-run", "--json", str(out)],
                          capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    r = json.loads(out.read_text())
    device = "cuda" if r["cuda"] else "cpu"
    assert r["dry_run"] and r["engine"] in ("deepspeed", "torch")
    rows = {row["path"]: row for row in r["train"]}
    assert list(rows) == ["mask4d", "flex", "flash_varlen"]
    for path, row in rows.items():
        reason = unavailable(path, device, training=True)
        if reason:
            assert row["status"] == f"skipped: {reason}"
            continue
        assert row["status"] == "ok", row
        assert row["tokens_per_s"] > 0 and row["step_s"] > 0 and row["steps"] == 2
        assert all(math.isfinite(x) for x in row["losses"])
    mask4d = rows["mask4d"]  # trains everywhere
    assert mask4d["implementation"] == "sdpa" and mask4d["mask_bytes"] == 2 * 256 * 256
    assert mask4d["params"] > 1e6 and mask4d["engine"] == r["engine"]
    codecs = {(c["codec"], c["batch"]) for c in r["codecs"]}
    assert codecs == {("speech", 1), ("speech", 2), ("music", 1), ("music", 2)}
    assert all(c["encode_rtf"] > 0 and c["encode_s"] > 0 for c in r["codecs"])
    assert [g["batch"] for g in r["generation"]] == [1, 2]
    assert all(g["decode_tokens_per_s"] > 0 and g["prefill_s"] > 0 for g in r["generation"])
    assert "anygpt bench gpu:" in proc.stdout and "tokens/s" in proc.stdout and "real-time factor" in proc.stdout


def test_torch_engine_trains_through_the_trainers_model_loss_and_attention(tmp_path):
    """The fallback for nodes without DeepSpeed: no process group, loss falls on a repeated batch shape."""
    from anygpt.train.bench import synthetic_corpus

    sizes = gpu_check.DRY
    corpus = synthetic_corpus(tmp_path / "data", pairs=16, conversations=0, eval_pairs=0, frames=sizes.frames)
    row = gpu_check.train_part("mask4d", "torch", sizes, tmp_path, corpus, checkpointing=True)
    assert row["status"] == "ok" and row["engine"] == "torch" and row["process_group"] is None
    assert row["implementation"] == "sdpa" and row["activation_checkpointing"] and row["dtype"] == "float32"
    assert row["tokens_per_s"] > 0 and len(row["losses"]) == sizes.steps
    assert all(math.isfinite(x) for x in row["losses"])


def test_peak_table_and_mfu():
    peaks = {"NVIDIA H100 80GB HBM3": 989.0, "NVIDIA H100 PCIe": 756.0, "NVIDIA H100 NVL": 835.0,
             "NVIDIA H200": 989.0, "NVIDIA A100-SXM4-80GB": 312.0, "NVIDIA A100 80GB PCIe": 312.0,
             "NVIDIA L40S": 362.0, "NVIDIA L40": 181.0, "NVIDIA L4": 121.0, "NVIDIA A10": 125.0,
             "NVIDIA GeForce RTX 4090": 165.0, "NVIDIA A10G": None, "Tesla V100-SXM2-32GB": None}
    assert {name: gpu_check.peak_bf16_tflops(name) for name in peaks} == peaks
    assert gpu_check.mfu(10**9, 1e4, 100.0) == pytest.approx(0.6)  # 6 * 1e9 * 1e4 / 1e14
    assert gpu_check.mfu(10**9, 1e4, None) is None


def test_wheels_install_pins_the_nodes_torch_and_names_what_stays_missing(monkeypatch, tmp_path, capsys):
    calls = []

    def fake_pip(cmd):
        constraints = Path(cmd[cmd.index("-c") + 1]).read_text().split()
        calls.append((cmd, constraints))
        return 1  # the wheel folder did not have it

    monkeypatch.setattr(gpu_check, "REQUIRED", {**gpu_check.REQUIRED, "anygpt_no_such_module": "anygpt-no-such-pkg"})
    monkeypatch.setattr(gpu_check, "OPTIONAL", {})
    monkeypatch.setattr(gpu_check.subprocess, "call", fake_pip)
    with pytest.raises(SystemExit, match=r"missing packages: anygpt-no-such-pkg; .*--wheels DIR"):
        gpu_check.ensure_packages(str(tmp_path))
    (cmd, constraints), = calls
    assert cmd[1:7] == ["-m", "pip", "install", "--no-index", "--find-links", str(tmp_path)]
    assert cmd[-1] == "anygpt-no-such-pkg"
    from importlib import metadata

    assert f"torch=={metadata.version('torch')}" in constraints  # the node's build, whatever its local tag
    assert f"transformers=={metadata.version('transformers')}" in constraints


def test_bench_gpu_runs_the_check_with_its_options(monkeypatch, capsys):
    from anygpt.cli import main

    seen = {}

    def fake_check(opts):
        seen["opts"] = opts
        return {"codecs": [{"codec": "speech", "batch": 1, "encode_rtf": 0.5}]}

    monkeypatch.setattr(gpu_check, "gpu_check", fake_check)
    assert main(["bench", "gpu", "--dry-run", "--paths", "mask4d"]) == 0
    assert seen["opts"].dry_run and seen["opts"].paths == "mask4d" and seen["opts"].engine == "auto"
    assert "codecs[speech/1].encode_rtf" in capsys.readouterr().out  # in the ratio table
    with pytest.raises(SystemExit, match="--paths: unknown path 'flash'"):
        gpu_check._paths("mask4d,flash")
