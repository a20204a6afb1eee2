"""A modality that exists only in a test module goes through the whole pipeline, as a user's plugin would:
codec fit -> preprocessing -> DeepSpeed training -> export -> constrained generation -> decoded file.

The plugin is ``tests/toy_modality.py`` + ``tests/assets/cards/toy_scalar.yaml`` and reaches every
process (the ranks too) through ``$ANYGPT_PLUGINS``; nothing in the package names it.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
TOY = str(REPO / "tests" / "toy_modality.py")


def anygpt(*argv: str, cwd: Path) -> str:
    env = {**os.environ, "ANYGPT_PLUGINS": TOY, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "anygpt.cli", *argv], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, f"anygpt {' '.join(argv[:2])}:\n{r.stdout[-2500:]}\n{r.stderr[-2500:]}"
    return r.stdout


@pytest.mark.slow
@pytest.mark.distributed
def test_toy_modality_trains_generates_and_decodes(tmp_path, tiny_tokenizer_dir):
    rng = np.random.default_rng(0)
    rows = []
    (tmp_path / "media").mkdir()
    for i in range(24):
        rising = i % 2 == 0
        trace = np.linspace(-0.8, 0.8, 200) * (1 if rising else -1) + 0.05 * rng.standard_normal(200)
        np.save(tmp_path / "media" / f"t{i}.npy", trace.astype(np.float32))
        rows.append({"id": f"t{i}", "text": "a rising signal" if rising else "a falling signal",
                     "toy": f"media/t{i}.npy"})
    manifest = tmp_path / "toy.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    traces = [str(tmp_path / "media" / f"t{i}.npy") for i in range(24)]

    anygpt("codec", "fit", "--modality", "toy", "--inputs", *traces, "--out", "codecs", "--iters", "5", cwd=tmp_path)
    anygpt("preprocess", "--source", "manifest", "--input", str(manifest), "--out", "shards", "--codecs", "codecs",
           cwd=tmp_path)
    stats = json.loads((tmp_path / "shards" / "stats.json").read_text())
    assert stats["written"] == 24 and stats["media"] == {"toy": 24}

    # The tokenizer of the session fixture was prepared without the plugin: a run with it appends the
    # toy range to a fresh layout built on the raw tokenizer.
    out = anygpt("train", "--config", "tiny_cpu", "run.dir=run", "run.max_steps=6", "run.save_every=6",
                 "run.log_every=1", "run.eval_every=0", f"model.tokenizer={tiny_tokenizer_dir.parent / 'raw'}",
                 "model.codecs=codecs", "data.sources.0.shards=shards/*.tar", "data.eval_shards=null",
                 "data.seq_len=128", "optim.warmup_steps=1", cwd=tmp_path)
    assert "error" not in out.lower()
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 6 and losses[-1] < losses[0]
    layout = json.loads((tmp_path / "run" / "checkpoints" / "step-00000006" / "vocab_layout.json").read_text())
    assert list(layout["modalities"]) == ["image", "speech", "music", "toy"]
    assert layout["modalities"]["toy"]["codec"] == "toy_scalar"

    anygpt("export", "--checkpoint", "run", "--out", "model", cwd=tmp_path)
    assert (tmp_path / "model" / "cards" / "toy.yaml").is_file()
    anygpt("generate", "--model", "model", "--out", "answers", "--seed", "0", "text|toy|a rising signal",
           cwd=tmp_path)
    (answer,) = (tmp_path / "answers").glob("*.npy")
    trace = np.load(answer)
    assert trace.ndim == 1 and trace.size >= 10 and trace.size % 10 == 0  # whole frames of 10 samples
