"""`anygpt align` runs on a tiny random model (one CPU rank, ZeRO-3): a deterministic reward ("more of
these codes") rises under GRPO and the export of the run carries it; offline DPO raises its margin;
SpeechAlign-style DPO regenerates its rejected answers per round; the `asr` reward runs inside the
trainer; mistakes (a missing reward model directory, ...) are one line before any rank starts, and ranks
that read different prompts stop the run."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
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


def write_config(path: Path, model_dir: Path, prompts_file: Path, run_dir: Path, **align) -> Path:
    """A GRPO stage YAML on the tiny model: speech prompts, the code-frequency reward (no guards: a
    random model's answers would fail them all); ``align`` replaces keys of the align section."""
    cfg = {"run": {"dir": str(run_dir), "max_steps": 12, "save_every": 6, "log_every": 1, "seed": 0,
                   "progress": False, "tensorboard": False},
           "model": {"name": str(model_dir), "codecs": "tiny"},
           "optim": {"lr": 0.02, "min_lr": 0.02, "warmup_steps": 0, "micro_batch_size": 4,
                     "deepspeed": "ds_configs/zero3.json"},
           "align": {"method": "grpo", "prompts": {"file": str(prompts_file)}, "prompts_per_step": 2, "group_size": 8,
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
        (["align.method=dpo", "align.dpo.chosen=best", "align.rewards=[]"],
         r"^align\.rewards: align\.dpo\.chosen: best needs at least one reward"),
        (["align.method=dpo", "align.dpo.chosen=bestest"], r"^align\.dpo\.chosen"),
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



def test_ranks_that_read_different_prompts_stop(tmp_path, model_dir, prompts):
    """Only the first rank names what it skipped while reading; a rank whose copy of the files holds
    other items (node-local data) must then stop the run, not train on a pool of its own."""
    site = tmp_path / "site"
    site.mkdir()
    # Rank 1 reads one prompt fewer, as if its node's copy of the file were older.
    (site / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('RANK') == '1':\n"
        "    import anygpt.align.rollout as r\n"
        "    _load = r.load_prompts\n"
        "    r.load_prompts = lambda *a, **k: _load(*a, **k)[:-1]\n")
    cfg = write_config(tmp_path / "a.yaml", model_dir, prompts, tmp_path / "run")
    env = _env()
    env["PYTHONPATH"] = str(site) + os.pathsep + env["PYTHONPATH"]
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "align.py"), "--nproc", "2", "--config", str(cfg),
                           "run.max_steps=1"], capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert proc.returncode != 0
    assert "the ranks read different prompts (counts by rank: [4, 3])" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


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
    proc = align(cfg, "run.max_steps=8", "run.save_every=8", "optim.lr=3e-3", "optim.min_lr=3e-3", nproc=2)
    # the bad line, named and skipped, said once (by the first of the 2 ranks)
    assert len(re.findall(r"pairs\.jsonl:9: .*; skipped", proc.stderr)) == 1, proc.stderr
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
def test_reward_ranked_dpo_raises_a_deterministic_reward(tmp_path, model_dir, prompts):
    """``align.dpo.chosen: best``: every step samples 8 answers per prompt afresh (one round per step),
    chosen = the best by the reward, rejected = the worst; the samples' reward rises as under GRPO."""
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "d.yaml", model_dir, prompts, run, method="dpo",
                       dpo={"beta": 0.1, "chosen": "best", "rounds": 12, "sft_weight": 1.0})
    proc = align(cfg)
    assert "best vs worst of 8 samples by rewards 1*code_frequency in 12 round(s)" in proc.stdout
    assert len(re.findall(r"round \d+/12: sampled 8 answers per prompt \(16 per rank\), ranked by the rewards",
                          proc.stdout)) == 12, proc.stdout
    rows = metrics(run)
    assert [r["step"] for r in rows] == list(range(1, 13))
    rewards = [r["reward"] for r in rows]
    first, last = np.mean(rewards[:3]), np.mean(rewards[-3:])
    assert first < 0.35 and last > first + 0.15, rewards  # chance is 0.25
    assert all(r["samples"] == 16 and r["time_generation"] > 0 for r in rows)
    assert rows[0]["margin"] == pytest.approx(0.0, abs=1e-5)  # policy == reference at the start


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


# ---------------------------------------------------------------------------- 2 ranks (slow, distributed)
KEYS = ("loss", "reward", "reward_std", "grad_norm", "kl", "clip_fraction", "ratio", "response_tokens")


@pytest.mark.slow
@pytest.mark.distributed
def test_two_rank_zero3_run_killed_and_resumed_repeats_every_step(tmp_path, model_dir, prompts):
    """GRPO with a KL term (reference model) and two updates per rollout (clipped ratio) on 2 ranks:
    SIGKILL after step 3 (last checkpoint: step 2), `--resume auto` -> the per-step metrics of the
    uninterrupted run, exactly (fp32); the run's export loads and differs from the start."""
    from anygpt.train.export import export_checkpoint

    def config(name: str) -> Path:
        return write_config(tmp_path / f"{name}.yaml", model_dir, prompts, tmp_path / name, group_size=4,
                            updates_per_rollout=2, grpo={"kl_beta": 0.05})

    common = ["run.max_steps=5", "run.save_every=2", "optim.lr=5e-3", "optim.min_lr=5e-3"]
    align(config("A"), *common, nproc=2)
    a = metrics(tmp_path / "A")
    assert [r["step"] for r in a] == [1, 2, 3, 4, 5] and a[-1]["samples"] == 16  # 2 ranks x 2 prompts x 4
    assert a[-1]["kl"] > 0 and all(math.isfinite(r["loss"]) for r in a)

    killed = align(config("B"), *common, nproc=2, faults="kill_after_step@3", expect_ok=False)
    assert killed.returncode != 0
    assert [r["step"] for r in metrics(tmp_path / "B")] == [1, 2, 3]
    resumed = align(config("B"), *common, nproc=2, resume="auto")
    assert "resumed at step 2" in resumed.stdout, resumed.stdout[-2000:]
    b = metrics(tmp_path / "B")
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5]
    for ra, rb in zip(a, b):
        for key in KEYS:
            assert rb[key] == pytest.approx(ra[key], rel=1e-6, abs=1e-7), (ra["step"], key, ra[key], rb[key])

    out = tmp_path / "A.model"
    export_checkpoint(tmp_path / "A", out)
    from safetensors.torch import load_file

    start, aligned = load_file(str(model_dir / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert start.keys() == aligned.keys()
    assert any(not torch.equal(start[k], aligned[k]) for k in start)


# ---------------------------------------------------------------------------- shipped stage YAMLs
ALIGN_YAMLS = sorted((REPO / "launch" / "configs").glob("align_*.yaml"))


def test_shipped_align_yamls_open_with_their_launch_command():
    assert {p.name for p in ALIGN_YAMLS} == {"align_grpo_whisper.yaml", "align_dpo.yaml", "align_demo.yaml"}
    for path in ALIGN_YAMLS:
        first = path.read_text().splitlines()[0]
        assert first.startswith("# ") and "launch/align.py" in first and f"--config launch/configs/{path.name}" in first


def test_readme_grpo_recipe_passes_preflight_unchanged(tmp_path, model_dir, monkeypatch):
    """The README's real-use layout (an export with its codecs, the downloaded Whisper, speech shards) in
    a fresh directory: the shipped GRPO and DPO YAMLs pass every check, unchanged, for 8 GPU ranks; a
    missing Whisper is one line naming the directory to download."""
    import shutil

    from anygpt import modalities as registry
    from anygpt.align.config import load_align_config
    from anygpt.align.loop import preflight
    from anygpt.align.testing import tiny_whisper_dir
    from anygpt.config import ConfigError
    from anygpt.train.bench import synthetic_corpus

    monkeypatch.chdir(tmp_path)
    shutil.copytree(model_dir, "models/anygpt-sft")
    registry.build_codec("speech", "tiny").save(Path("models/anygpt-sft/codecs/speech"))
    shards = synthetic_corpus(tmp_path / "syn", pairs=12, conversations=0, eval_pairs=0, tokenizer=False)
    shutil.copytree(Path(shards["pairs"]).parent, "data/shards/speech")
    grpo_yaml = REPO / "launch" / "configs" / "align_grpo_whisper.yaml"
    with pytest.raises(ConfigError, match=r"options\.model checkpoints/whisper-large-v3: no such directory"):
        preflight(load_align_config(grpo_yaml), 8, cuda=True)
    tiny_whisper_dir(tmp_path / "checkpoints" / "whisper-large-v3")
    for path in (grpo_yaml, REPO / "launch" / "configs" / "align_dpo.yaml"):
        cfg = load_align_config(path)
        assert cfg.model.codecs == "models/anygpt-sft/codecs"  # found in the export
        plan = preflight(cfg, 8, cuda=True)
        ds = plan.ds_config
        assert ds["bf16"]["enabled"] and ds["zero_optimization"]["stage"] == 3
        assert ds["train_batch_size"] == cfg.sequences_per_update * 8  # every sequence of a step, 8 ranks
    grpo = load_align_config(grpo_yaml)
    assert grpo.align.group_size == 16 and grpo.optim.lr == 1e-6 and grpo.align.grpo.kl_beta == 0
    assert grpo.align.rewards[0].options["metric"] == "cer_nll"


# ---------------------------------------------------------------------------- anygpt bench align
@pytest.mark.slow
@pytest.mark.distributed
def test_bench_align_splits_a_step_and_compares_the_two_rollouts(tmp_path):
    from anygpt.align.bench import bench_align

    r = bench_align(steps=1, repeats=1, workdir=tmp_path, verbose=False)
    assert r["world_size"] == 2 and r["samples_per_rank"] == 8
    assert sum(r["split"].values()) == pytest.approx(1.0)
    assert all(r[f"{k}_s"] > 0 for k in ("generation", "reward", "update"))
    g = r["rollout"]
    assert g["identical_answers"] and g["tokens_per_rank"] > 0  # both ways generate the same ids
    assert g["gather_once_speedup"] == pytest.approx(g["partitioned_s"] / g["gathered_once_s"])
