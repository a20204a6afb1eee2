"""Speech through the tiny Mimi codec end to end: fit -> preprocess -> DeepSpeed training -> export ->
SoundStorm on Mimi's acoustic codebooks -> text->speech generation -> a 24 kHz wav; and a model trained
with one speech codec refuses the other's codecs and shards in one line naming both."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

WORDS = ("one two three red green blue circles squares").split()


def anygpt(*argv: str, cwd: Path, ok: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "anygpt.cli", *argv], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=900)
    if ok:
        assert r.returncode == 0, f"anygpt {' '.join(argv[:2])}:\n{r.stdout[-2500:]}\n{r.stderr[-2500:]}"
    return r


def speech_corpus(root: Path, n: int) -> Path:
    """Spoken sentences (espeak-ng when present, else distinct tone patterns per word) and a manifest."""
    rng = np.random.default_rng(0)
    (root / "media").mkdir(parents=True)
    rows = []
    for i in range(n):
        words = [WORDS[j] for j in rng.choice(len(WORDS), 3)]
        path = root / "media" / f"s{i}.wav"
        if shutil.which("espeak-ng"):
            subprocess.run(["espeak-ng", "-w", str(path), " ".join(words)], check=True)
        else:
            t = np.arange(16000) / 16000
            sf.write(path, 0.3 * np.sin(2 * np.pi * (200 + 100 * WORDS.index(words[0])) * t), 16000)
        rows.append({"id": f"s{i}", "text": " ".join(words), "speech": f"media/s{i}.wav"})
    (root / "speech.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "speech.jsonl"


@pytest.mark.slow
@pytest.mark.distributed
def test_tiny_mimi_trains_generates_and_decodes_speech(tmp_path, tiny_tokenizer_dir):
    manifest = speech_corpus(tmp_path / "corpus", 24)
    wavs = [str(p) for p in sorted((tmp_path / "corpus" / "media").glob("*.wav"))]
    anygpt("codec", "fit", "--modality", "speech", "--codec", "mimi", "--inputs", *wavs, "--out", "codecs",
           "--iters", "5", "--clusters", "32", cwd=tmp_path)
    assert "name: mimi" in (tmp_path / "codecs" / "speech" / "card.yaml").read_text()
    anygpt("preprocess", "--source", "manifest", "--input", str(manifest), "--out", "shards", "--codecs", "codecs",
           cwd=tmp_path)
    stats = json.loads((tmp_path / "shards" / "stats.json").read_text())
    assert stats["written"] == 24
    # 12.5 LM positions per second of speech (SpeechTokenizer: 50), up to a partial frame per clip
    seconds = stats["audio_hours"]["speech"] * 3600
    assert 12.5 * seconds <= stats["tokens"]["speech"] <= 12.5 * seconds + 24

    raw = str(tiny_tokenizer_dir.parent / "raw")
    train = ["train", "--config", "tiny_cpu", "run.dir=run", "run.max_steps=6", "run.save_every=6",
             "run.log_every=1", "run.eval_every=0", f"model.tokenizer={raw}", "model.codecs=codecs",
             "data.sources.0.shards=shards/*.tar", "data.eval_shards=null", "data.seq_len=128",
             "optim.warmup_steps=1"]
    anygpt(*train, cwd=tmp_path)
    layout = json.loads((tmp_path / "run" / "checkpoints" / "step-00000006" / "vocab_layout.json").read_text())
    assert layout["modalities"]["speech"]["codec"] == "mimi"
    assert layout["modalities"]["speech"]["codebook_size"] == 2048
    losses = [json.loads(x)["loss"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0]
    anygpt("export", "--checkpoint", "run", "--out", "model", cwd=tmp_path)
    anygpt("soundstorm", "--config", "soundstorm", "run.dir=model/soundstorm", "run.max_steps=4", "run.device=cpu",
           "run.progress=false", "data.shards=shards/*.tar", "data.batch_size=4", "data.max_frames=50",
           "model.codecs=codecs", "model.size=tiny", "optim.warmup_steps=1", cwd=tmp_path)
    anygpt("generate", "--model", "model", "--out", "answers", "--seed", "0", "text|speech|one red circle",
           cwd=tmp_path)
    (wav,) = (tmp_path / "answers").glob("*.wav")
    info = sf.info(str(wav))
    assert info.samplerate == 24000 and info.frames > 0 and info.frames % 1920 == 0  # whole 12.5 Hz frames

    # A SpeechTokenizer codecs directory and SpeechTokenizer shards are refused by the Mimi model.
    anygpt("codec", "fit", "--modality", "speech", "--inputs", *wavs[:8], "--out", "st_codecs", "--iters", "2",
           cwd=tmp_path)
    r = anygpt("generate", "--model", "model", "--codecs", "st_codecs", "--out", "x", "speech|text|" + wavs[0],
               cwd=tmp_path, ok=False)
    assert r.returncode != 0 or "error" in r.stdout + r.stderr
    assert "mimi" in r.stdout + r.stderr and "speechtokenizer" in r.stdout + r.stderr
    anygpt("preprocess", "--source", "manifest", "--input", str(manifest), "--out", "st_shards",
           "--codecs", "st_codecs", cwd=tmp_path)
    r = anygpt("train", *train[1:], "run.dir=run2", "model.name=model", "model.codecs=null",
               "data.sources.0.shards=st_shards/*.tar", cwd=tmp_path, ok=False)
    err = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(err) == 1 and "speechtokenizer" in err[0] and "mimi" in err[0], r.stderr
