"""`anygpt align` runs on a tiny random model (one CPU rank, ZeRO-3): a deterministic reward ("more of
these codes") rises under GRPO and the export of the run carries it; offline DPO raises its margin;
SpeechAlign-style DPO regenerates its rejected answers per round; the `asr` reward runs inside the
trainer; mistakes (a missing reward model directory, ...) are one line before any rank starts."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
# Multiples of 4 among the speech codes: a random model samples them a quarter of the time.
EVERY_FOURTH = list(range(0, 1024, 4))
TEXTS = ["hello world", "the cat sits", "a red bus", "green trees"]


def _env(faults: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "ANYGPT_TRAIN_FAULTS")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    if faults:
        env["ANYGPT_TRAIN_FAULTS"] = faults
    return env


def write_config(path: Path, model_dir: Path, prompts: Path, run_dir: Path, **align) -> Path:
    """A GRPO stage YAML on the tiny model: speech prompts, the code-frequency reward (no guards: a
    random model's answers would fail them all)."""
    cfg = {"run": {"dir": str(run_dir), "max_steps": 12, "save_every": 6, "log_every": 1, "seed": 0,
                   "progress": False, "tensorboard": False},
           "model": {"name": str(model_dir), "codecs": "tiny"},
           "optim": {"lr": 0.02, "min_lr": 0.02, "warmup_steps": 0, "micro_batch_size": 4,
                     "deepspeed": "ds_configs/zero3.json"},
           "align": {"method": "grpo", "prompts": {"file": str(prompts)}, "prompts_per_step": 2, "group_size": 8,
                     "max_new_tokens": 40, "sampling": ["speech.max_tokens=24"], "guards": {"enabled": False},
                     "rewards": [{"name": "code_frequency", "options": {"modality": "speech",
                                                                        "codes": EVERY_FOURTH}}]}}
    for key, value in align.items():
        cfg["align"][key] = value
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def align(config: Path, *overrides: str, nproc: int = 1, resume: str | None = None, faults: str | None = None,
          expect_ok: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "launch" / "align.py"), "--nproc", str(nproc), "--config", str(config),
           *overrides] + (["--resume", resume] if resume else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(faults), cwd=REPO, timeout=600)
    if expect_ok and proc.returncode != 0:
        pytest.fail(f"align failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from anygpt.infer.testing import build_tiny_model_dir

    return build_tiny_model_dir(tmp_path_factory.mktemp("align_model"))


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"modality": "speech", "text": t}) + "\n" for t in TEXTS))
    return path


def share(codes_list: list[np.ndarray]) -> float:
    row = np.concatenate([np.asarray(c)[0] for c in codes_list if np.asarray(c).size])
    return float(np.isin(row, EVERY_FOURTH).mean())


# ---------------------------------------------------------------------------- preflight (fast)
@pytest.fixture
def no_launch(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a rank was spawned or a model built for an invalid config")

    monkeypatch.setattr("anygpt.align.cli.spawn_ranks", boom)
    monkeypatch.setattr("anygpt.align.loop.align", boom)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)


def test_mistakes_are_one_line_before_any_rank_starts(tmp_path, model_dir, prompts, no_launch, capsys):
    from anygpt.align.cli import align_main

    cfg = write_config(tmp_path / "a.yaml", model_dir, prompts, tmp_path / "run")
    missing_asr = json.dumps([{"name": "asr", "options": {"model": str(tmp_path / "whisper-small")}}])
    cases = [
        ([f"align.rewards={missing_asr}"], r"^align\.rewards\[0\]\.options\.model .*whisper-small: no such directory"),
        ([f"align.prompts.file={tmp_path / 'none.jsonl'}"], r"^align\.prompts\.file: .*none\.jsonl not found"),
        (["align.sampling=[speech.temprature=0.8]"], r"^align\.sampling: "),
        ([f"model.name={tmp_path}"], r"^model\.name: .* not an exported model directory"),
        (["align.method=dpo", f"align.dpo.pairs={tmp_path / 'pairs.jsonl'}"], r"^align\.dpo\.pairs: .* not found"),
    ]
    for overrides, pattern in cases:
        rc = align_main(["--config", str(cfg), "--nproc", "2", *overrides])
        out, err = capsys.readouterr()
        lines = err.strip().splitlines()
        assert rc == 1 and len(lines) == 1 and lines[0].startswith("error: "), (overrides, err)
        assert re.search(pattern, lines[0][len("error: "):]), lines[0]
        assert out == "" and not (tmp_path / "run").exists()


def test_missing_asr_dir_through_the_launch_script(tmp_path, model_dir, prompts):
    """The real entry point: status 1, one line, no torchrun output, no run directory."""
    cfg = write_config(tmp_path / "a.yaml", model_dir, prompts, tmp_path / "run",
                       rewards=[{"name": "asr", "options": {"model": str(tmp_path / "asr")}}])
    proc = align(cfg, nproc=2, expect_ok=False)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        f"error: align.rewards[0].options.model {tmp_path / 'asr'}: no such directory (a local Whisper or wav2vec 2.0 "
        f"CTC model directory)"]
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------- runs (slow)
@pytest.mark.slow
def test_grpo_raises_a_deterministic_reward_and_the_export_carries_it(tmp_path, model_dir, prompts):
    from anygpt.infer.loading import load_lm
    from anygpt.infer.settings import GenerationConfig, apply_setting_overrides
    from anygpt.eval.run import answer_media
    from anygpt.train.export import export_checkpoint

    run = tmp_path / "run"
    align(write_config(tmp_path / "a.yaml", model_dir, prompts, run))
    rows = metrics(run)
    assert [r["step"] for r in rows] == list(range(1, 13))
    rewards = [r["reward"] for r in rows]
    first, last = np.mean(rewards[:3]), np.mean(rewards[-3:])
    assert first < 0.35 and last > first + 0.15, rewards  # chance is 0.25
    assert all(r["reward_parts"]["code_frequency"] == pytest.approx(r["reward"]) for r in rows)
    assert all(r["samples"] == 16 and r["time_generation"] > 0 and r["time_update"] > 0 for r in rows)
    for name in ("config.yaml", "reward.png", "checkpoints/latest"):
        assert (run / name).exists(), name

    # `anygpt export` on the align run: a model directory whose samples carry the learned preference.
    out = tmp_path / "aligned"
    export_checkpoint(run, out)
    cfg = GenerationConfig(max_new_tokens=40, seed=123)
    cfg.modes = apply_setting_overrides(cfg.modes, ["speech.max_tokens=24"])
    before = share(answer_media(load_lm(model_dir, device="cpu"), "speech", TEXTS * 4, cfg))
    after = share(answer_media(load_lm(out, device="cpu"), "speech", TEXTS * 4, cfg))
    assert after > before + 0.15, (before, after)


@pytest.mark.slow
def test_offline_dpo_raises_the_margin(tmp_path, model_dir, prompts):
    rng = np.random.default_rng(0)
    lines = []
    for i, t in enumerate(TEXTS * 2):
        good = rng.choice(EVERY_FOURTH, 12).tolist()
        bad = (rng.choice(EVERY_FOURTH, 12) + 1).tolist()
        lines.append({"id": f"p{i}", "prompt": [{"role": "user", "content": [{"text": f"Speak this sentence: {t}"}]}],
                      "chosen": [{"speech": [good]}], "rejected": [{"speech": [bad]}]})
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(x) + "\n" for x in lines) + "not json\n")
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "d.yaml", model_dir, prompts, run, method="dpo", prompts_per_step=2,
                       dpo={"beta": 0.1, "pairs": str(pairs)})
    proc = align(cfg, "run.max_steps=8", "run.save_every=8", "optim.lr=3e-3", "optim.min_lr=3e-3")
    assert re.search(r"pairs\.jsonl:9: .*; skipped", proc.stderr)  # the bad line, named and skipped
    rows = metrics(run)
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert rows[0]["margin"] == pytest.approx(0.0, abs=1e-5)  # policy == reference at the start
    assert rows[-1]["margin"] > 0.5 and rows[-1]["accuracy"] == 1.0
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.1


@pytest.mark.slow
def test_speechalign_dpo_regenerates_rejected_answers_each_round(tmp_path, model_dir):
    from anygpt.train.bench import synthetic_corpus

    shards = synthetic_corpus(tmp_path / "data", pairs=12, conversations=0, eval_pairs=0, tokenizer=False)
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "d.yaml", model_dir, tmp_path / "unused.jsonl", run, method="dpo",
                       prompts={"shards": [shards["pairs"]], "modalities": ["speech", "music"]},
                       prompts_per_step=2, dpo={"beta": 0.1, "rounds": 2}, sampling=["all.max_tokens=24"])
    proc = align(cfg, "run.max_steps=4", "run.save_every=4")
    assert len(re.findall(r"round \d/2: sampled 4 rejected answers per rank", proc.stdout)) == 2, proc.stdout
    rows = metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[0]["time_generation"] > 0 and rows[1]["time_generation"] == 0 and rows[2]["time_generation"] > 0


@pytest.mark.slow
def test_asr_reward_inside_the_trainer(tmp_path, model_dir, prompts):
    from anygpt.align.testing import tiny_whisper_dir

    whisper = tiny_whisper_dir(tmp_path / "whisper")
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "a.yaml", model_dir, prompts, run, group_size=2,
                       rewards=[{"name": "asr", "options": {"model": str(whisper), "soundstorm": "tiny"}},
                                {"name": "code_frequency", "weight": 0.5,
                                 "options": {"modality": "speech", "codes": EVERY_FOURTH}}])
    align(cfg, "run.max_steps=2", "run.save_every=2")
    rows = metrics(run)
    parts = rows[-1]["reward_parts"]
    assert {"asr", "asr/cer", "asr/wer", "asr/nll", "asr/u_cer", "asr/u_nll", "code_frequency"} <= set(parts)
    assert parts["asr/nll"] > 0 and parts["asr/cer"] >= 0
    assert rows[-1]["reward"] == pytest.approx(parts["asr"] + 0.5 * parts["code_frequency"], abs=1e-6)
