"""Training units (no process group): schedule, checkpoint pointer logic, loss breakdown, metrics and
plot, fault parsing, and every kind of invalid config failing as one line before anything starts."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from anygpt.attention import unavailable
from anygpt.train.bench import synthetic_corpus
from anygpt.train.checkpoint import (COMPLETE, POINTER, TRAINER_STATE, CheckpointError, CheckpointManager,
                                     latest_checkpoint, resolve_checkpoint, tag_for)
from anygpt.train.faults import Faults
from anygpt.train.schedule import lr_at

REPO = Path(__file__).resolve().parents[1]
TINY_YAML = REPO / "launch" / "configs" / "tiny_cpu.yaml"


# ---------------------------------------------------------------------------- schedule
def test_warmup_then_cosine_to_min_lr():
    lrs = [lr_at(s, 1.0, 0.1, 4, 20) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]  # never an update at lr 0
    assert lrs[4] == 1.0 and math.isclose(lrs[-1], 0.1)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))  # monotone decay
    assert lr_at(100, 1.0, 0.1, 4, 20) == pytest.approx(0.1)  # past the end: stays at min_lr
    assert lr_at(0, 1.0, 0.1, 0, 10) == 1.0  # no warmup


# ---------------------------------------------------------------------------- checkpoints
def _fake_ckpt(root: Path, step: int, complete: bool = True, world_size: int = 1) -> Path:
    d = root / tag_for(step)
    d.mkdir(parents=True)
    (d / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"x")
    if complete:
        (d / TRAINER_STATE).write_text(json.dumps({"step": step, "world_size": world_size, "lora": None}))
        (d / COMPLETE).write_text("{}")
    return d


def test_pointer_names_only_complete_checkpoints(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    c2 = _fake_ckpt(root, 2)
    c4 = _fake_ckpt(root, 4)
    (root / POINTER).write_text(c2.name)
    assert latest_checkpoint(root) == c2  # the pointer is authoritative
    (root / POINTER).write_text(c4.name)
    _fake_ckpt(root, 6, complete=False)  # a save killed midway: shards but no marker, pointer not moved
    assert latest_checkpoint(root) == c4
    assert resolve_checkpoint(tmp_path / "run") == c4  # run dir -> its newest complete checkpoint
    with pytest.raises(CheckpointError, match="incomplete"):
        resolve_checkpoint(root / tag_for(6))
    (root / POINTER).write_text(tag_for(6))  # a damaged pointer falls back to the newest complete one
    assert latest_checkpoint(root) == c4
    (root / POINTER).unlink()
    assert latest_checkpoint(root) == c4
    with pytest.raises(CheckpointError):
        resolve_checkpoint(tmp_path / "nothing")


class _FakeEngine:
    def save_checkpoint(self, save_dir, tag, save_latest):
        assert save_latest is False  # our pointer, not DeepSpeed's, says what is complete
        (Path(save_dir) / tag).mkdir(parents=True, exist_ok=True)
        (Path(save_dir) / tag / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"m")


def test_save_marks_complete_moves_pointer_last_and_keeps_last_k(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2, rank=0, world_size=1)
    static = {"config.yaml": "a: 1\n", "tokenizer": lambda t: t.mkdir()}
    for step in (2, 4, 6):
        ckpt = mgr.save(_FakeEngine(), step, {"pos": step}, {"tokens": step}, static)
        assert (tmp_path / "checkpoints" / POINTER).read_text() == ckpt.name
        assert (ckpt / COMPLETE).is_file() and (ckpt / "tokenizer").is_dir() and (ckpt / "rank00000.pt").is_file()
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir())
    assert names == [tag_for(4), tag_for(6)]  # keep_last=2
    state = json.loads((tmp_path / "checkpoints" / tag_for(6) / TRAINER_STATE).read_text())
    assert state == {"tokens": 6, "step": 6, "world_size": 1}
    # A leftover partial directory of a later step is replaced when that step is saved again.
    partial = _fake_ckpt(tmp_path / "checkpoints", 8, complete=False)
    (partial / "stale.bin").write_bytes(b"old")
    mgr.save(_FakeEngine(), 8, {}, {"tokens": 8}, static)
    assert not (partial / "stale.bin").exists() and (partial / COMPLETE).is_file()


def test_faults_parse_and_target_ranks():
    f = Faults("nan_loss@3, kill_after_step@5:1", rank=0)
    assert f.active("nan_loss", 3) and not f.active("kill_after_step", 5)
    assert Faults("kill_after_step@5:1", rank=1).active("kill_after_step", 5)
    with pytest.raises(ValueError, match="bad item"):
        Faults("explode@3", rank=0)


# ---------------------------------------------------------------------------- loss breakdown
def test_token_loss_matches_cross_entropy_and_splits_by_modality_and_task(tiny_layout):
    from anygpt.data import TASK_NAMES
    from anygpt.train.losses import TokenLoss

    lf = TokenLoss(tiny_layout, TASK_NAMES, torch.device("cpu"))
    torch.manual_seed(0)
    b, t, v = 2, 12, tiny_layout.total
    logits = torch.randn(b, t, v)
    img = tiny_layout.modalities["image"].offset
    labels = torch.tensor([[-100, 5, 6, img, img + 1, 7, -100, -100, 8, 9, img + 2, 10]] * 2)
    tasks = torch.full((b, t), TASK_NAMES.index("text2image"))
    tasks[1] = TASK_NAMES.index("image2text")
    loss, stats, bad = lf(logits, labels, tasks)
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, v), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert torch.allclose(loss, ref) and bad == []
    by_mod, by_task = lf.summarize(stats)
    assert set(by_mod) == {"text", "image"} and set(by_task) == {"text2image", "image2text"}
    m = len(lf.modalities)
    assert stats[1, :m].sum() == (labels[:, 1:] != -100).sum() == stats[1, m:].sum()
    img_mask = (labels[:, 1:] >= img) & (labels[:, 1:] < img + 8192)
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, v), labels[:, 1:].reshape(-1),
                                           ignore_index=-100, reduction="none").view(b, t - 1)
    assert by_mod["image"] == pytest.approx(float(ce[img_mask].mean()), rel=1e-6)
    logits[1, 3, 0] = float("nan")
    _, _, bad = lf(logits, labels, tasks)
    assert bad == [1]  # the row whose loss is not finite (its sample keys get logged)
    flat = logits[torch.nn.functional.pad(labels[:, 1:] != -100, (0, 1), value=False)]
    assert lf(flat, labels, tasks)[2] == [1]  # [N, V] logits at the target positions: same rows


def test_lm_head_only_at_targets_gives_the_full_forward_loss_and_gradients(tiny_layout):
    from transformers import LlamaConfig, LlamaForCausalLM

    from anygpt.data import TASK_NAMES
    from anygpt.train.losses import TokenLoss, logits_only_at, target_positions

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tiny_layout.total, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2)
    model = LlamaForCausalLM(cfg)
    lf = TokenLoss(tiny_layout, TASK_NAMES, torch.device("cpu"))
    ids = torch.randint(0, 500, (3, 16))
    labels = ids.clone()
    labels[:, :9] = -100
    labels[1, 12:] = -100
    full_loss, full_stats, _ = lf(model(input_ids=ids).logits, labels)
    full_grad = torch.autograd.grad(full_loss, model.lm_head.weight)[0]
    with logits_only_at(model, target_positions(labels)):
        logits = model(input_ids=ids).logits
    assert logits.shape == (int((labels[:, 1:] != -100).sum()), tiny_layout.total)
    loss, stats, _ = lf(logits, labels)
    assert torch.allclose(loss, full_loss, atol=1e-6) and torch.allclose(stats, full_stats, atol=1e-5)
    assert torch.allclose(torch.autograd.grad(loss, model.lm_head.weight)[0], full_grad, atol=1e-7)
    assert model(input_ids=ids).logits.shape == (3, 16, tiny_layout.total)  # hook gone after the block


def test_chunked_head_cross_entropy_matches_the_logits_path_for_any_weighting(tiny_layout, monkeypatch):
    import anygpt.train.losses as losses

    monkeypatch.setitem(losses._CHUNK_BYTES, "cpu", 4 * 1000 * 40)  # 40 rows a chunk: 8 chunks, a short last one
    torch.manual_seed(0)
    n, h, v = 300, 16, 1000
    hidden = torch.randn(n, h, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, v, (n,))
    per_row = torch.rand(n, dtype=torch.float64)
    for plain_mean in (True, False):
        for weights in (None, per_row):  # a mean (training), per-token weights (alignment)
            ce = losses.head_cross_entropy(hidden, weight, target, plain_mean=plain_mean).double()
            ref = torch.nn.functional.cross_entropy(hidden @ weight.t(), target, reduction="none")
            got, want = [(x.mean() if weights is None else (x * weights).sum()) for x in (ce, ref)]
            assert torch.allclose(got, want, rtol=1e-6)
            for a, b in zip(torch.autograd.grad(got, (hidden, weight)), torch.autograd.grad(want, (hidden, weight))):
                assert (a - b).abs().max() < 1e-5 * b.abs().max(), (plain_mean, weights is None)
    # A non-finite loss still gives non-finite gradients (the trainer relies on it to skip the update).
    ce = losses.head_cross_entropy(hidden, weight, target)
    g = torch.autograd.grad(ce.mean() * float("nan"), weight)[0]
    assert torch.isnan(g).all()
    # A micro-batch with no targets: an empty loss, zero gradients, no error.
    empty = losses.head_cross_entropy(hidden[:0], weight, target[:0])
    assert empty.shape == (0,) and not torch.autograd.grad(empty.sum(), weight)[0].any()


def test_lm_loss_through_the_chunked_head_equals_the_logits_path(tiny_layout):
    from transformers import LlamaConfig, LlamaForCausalLM

    from anygpt.data import TASK_NAMES
    from anygpt.train.losses import TokenLoss, fusable_head, lm_loss, logits_only_at, target_positions

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tiny_layout.total, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2)
    model = LlamaForCausalLM(cfg)
    assert fusable_head(model) is model.lm_head
    lf = TokenLoss(tiny_layout, TASK_NAMES, torch.device("cpu"))
    ids = torch.randint(0, 500, (3, 16))
    labels = ids.clone()
    labels[:, :9] = -100
    labels[1, 12:] = -100
    tasks = torch.full((3, 16), TASK_NAMES.index("text2image"))
    with logits_only_at(model, target_positions(labels)):
        ref_loss, ref_stats, _ = lf(model(input_ids=ids).logits, labels, tasks)
    ref_grads = torch.autograd.grad(ref_loss, [model.lm_head.weight, model.model.embed_tokens.weight])
    batch = {"labels": labels, "tasks": tasks}
    loss, stats, bad = lm_loss(model, model, {"input_ids": ids}, batch, lf)
    assert torch.allclose(loss, ref_loss, atol=1e-6) and torch.allclose(stats, ref_stats, atol=1e-5) and bad == []
    grads = torch.autograd.grad(loss, [model.lm_head.weight, model.model.embed_tokens.weight])
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(grads, ref_grads))
    assert model(input_ids=ids).logits.shape == (3, 16, tiny_layout.total)  # the head's forward is back


# ---------------------------------------------------------------------------- metrics + plot
def test_metrics_resume_truncates_and_plot_writes_png(tmp_path):
    from anygpt.train.metrics import METRICS, RunLogger, read_jsonl
    from anygpt.train.plot import PlotError, plot_run

    log = RunLogger(tmp_path, True, tensorboard=True)
    for s in range(1, 7):
        log.log_train({"step": s, "loss": 5.0 - s * 0.1, "lr": 1e-3, "loss_by_modality": {"text": 4.0, "image": 6.0}})
    log.log_train({"step": 7, "loss": float("nan"), "skipped": True, "nonfinite_keys": ["a/b/c"]})
    log.log_eval({"step": 6, "loss": 4.5, "loss_by_task": {"image2text": 4.0}})
    log.close()
    rows = read_jsonl(tmp_path / METRICS)
    assert [r["step"] for r in rows] == list(range(1, 8)) and rows[-1]["loss"] is None  # strict JSON, no NaN
    assert list((tmp_path / "tb").iterdir())  # TensorBoard event file
    png = plot_run(tmp_path)
    assert png == tmp_path / "loss.png" and png.stat().st_size > 1000
    RunLogger(tmp_path, True, start_step=4, resumed=True, tensorboard=False).close()
    assert [r["step"] for r in read_jsonl(tmp_path / METRICS)] == [1, 2, 3, 4]
    with pytest.raises(PlotError):
        plot_run(tmp_path / "empty")


def test_plot_command_on_a_run_dir(tmp_path, capsys):
    import argparse

    from anygpt.train.cli import add_plot_parser
    from anygpt.train.metrics import RunLogger

    log = RunLogger(tmp_path, True, tensorboard=False)
    log.log_train({"step": 1, "loss": 3.0, "lr": 1e-3})
    log.close()
    parser = argparse.ArgumentParser()
    add_plot_parser(parser.add_subparsers())
    args = parser.parse_args(["plot", str(tmp_path)])
    assert args.handler(args) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "loss.png")


# ---------------------------------------------------------------------------- invalid configs
@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return synthetic_corpus(tmp_path_factory.mktemp("shards"), pairs=8, conversations=0, eval_pairs=2,
                            per_shard=4, tokenizer=False)


@pytest.fixture
def valid_args(tmp_path, shards, tiny_tokenizer_dir):
    return ["--config", str(TINY_YAML), f"run.dir={tmp_path / 'run'}", f"model.tokenizer={tiny_tokenizer_dir}",
            f"data.sources.0.shards={shards['pairs']}", f"data.eval_shards={shards['eval']}", "run.max_steps=20"]


@pytest.fixture
def no_launch(monkeypatch):
    """Fail the test if anything would be spawned or trained."""
    def boom(*a, **k):
        raise AssertionError("a process was spawned or a model was built for an invalid config")

    monkeypatch.setattr("anygpt.train.cli.spawn_ranks", boom)
    monkeypatch.setattr("anygpt.train.loop.train", boom)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):  # as typed in a shell, not inside a launched rank
        monkeypatch.delenv(var, raising=False)


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def _bad_cases(tmp: Path) -> list[tuple[str, list[str], list[str], str]]:
    """(kind, overrides, extra CLI args, expected message regex)."""
    ds_bad_batch = _write(tmp / "bad_batch.json", json.dumps(
        {"train_batch_size": 64, "train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 3}}))
    ds_optimizer = _write(tmp / "opt.json", json.dumps({"optimizer": {"type": "AdamW"},
                                                        "zero_optimization": {"stage": 3}}))
    ds_stage0 = _write(tmp / "stage0.json", json.dumps({"zero_optimization": {"stage": 0}}))
    ds_broken = _write(tmp / "broken.json", "{\"zero_optimization\": ")
    bad_yaml = _write(tmp / "bad.yaml", "run: [unclosed\n")
    (tmp / "empty_dir").mkdir(exist_ok=True)
    return [
        ("missing config file", [], ["--config", str(tmp / "nope.yaml")], r"nope\.yaml: cannot read config"),
        ("invalid YAML", [], ["--config", bad_yaml], r"invalid YAML"),
        ("unknown key", ["optim.lrr=1"], [], r"^optim\.lrr: unknown key"),
        ("wrong type", ["run.max_steps=ten"], [], r"^run\.max_steps: expected an integer"),
        ("inconsistent values", ["optim.min_lr=1.0"], [], r"^optim\.min_lr: need 0 <= min_lr <= lr"),
        ("missing model dir", [f"model.name={tmp / 'no_model'}"], [], r"^model\.name: .* neither a named config"),
        ("dir that is no model", [f"model.name={tmp / 'empty_dir'}"], [], r"^model\.name: .*neither a Hugging Face"),
        ("missing tokenizer", [f"model.tokenizer={tmp / 'no_tok'}"], [], r"^model\.tokenizer: .* is not a directory"),
        ("missing DeepSpeed JSON", [f"optim.deepspeed={tmp / 'no.json'}"], [], r"^optim\.deepspeed: .*no\.json not found"),
        ("broken DeepSpeed JSON", [f"optim.deepspeed={ds_broken}"], [], r"^optim\.deepspeed: .* not valid JSON"),
        ("batch arithmetic", [f"optim.deepspeed={ds_bad_batch}"], [],
         r"^optim\.deepspeed: .*train_batch_size=64 but optim\.micro_batch_size 4 x optim\.grad_accum 1 x world size 2"),
        ("optimizer in JSON", [f"optim.deepspeed={ds_optimizer}"], [], r"remove the 'optimizer' section"),
        ("ZeRO stage", [f"optim.deepspeed={ds_stage0}"], [], r"zero_optimization\.stage must be one of \[1, 2, 3\]"),
        ("missing shards", [f"data.sources.0.shards={tmp / 'none-*.tar'}"], [], r"^data\.sources\[0\]\.shards: "),
        ("missing eval shards", [f"data.eval_shards={tmp / 'none-*.tar'}"], [], r"^data\.eval_shards: "),
        ("missing codecs dir", [f"model.codecs={tmp / 'no_codecs'}"], [], r"^model\.codecs: .* is not a directory"),
        ("unknown LoRA target", ["model.lora.enabled=true", "model.lora.target_modules=[qq_proj]"], [],
         r"^model\.lora\.target_modules: \['qq_proj'\] not in a LLaMA model"),
        ("resume from a non-checkpoint", [], ["--resume", str(tmp / "empty_dir")], r"^--resume: .*no complete checkpoint"),
        ("bad --nproc", [], ["--nproc", "0"], r"^--nproc: must be >= 1"),
        ("unknown attention path", ["model.attention=flash"], [], r"^model\.attention: 'flash' is not one of"),
    ] + ([] if torch.cuda.is_available() else
         [("fp16 without CUDA", ["optim.precision=fp16"], [], r"^optim\.precision: fp16 needs CUDA"),
          ("flash_varlen without CUDA", ["model.attention=flash_varlen"], [],
           r"^model\.attention: flash_varlen needs a CUDA GPU")]) + (
        [("flex where it has no backward", ["model.attention=flex"], [], r"^model\.attention: flex cannot train on cpu")]
        if not torch.cuda.is_available() and unavailable("flex", "cpu") else [])


def test_every_invalid_config_is_one_line_before_anything_starts(tmp_path, valid_args, no_launch, capsys):
    """Each kind of mistake: exit 1, exactly one `error:` line naming the key, nothing spawned or written."""
    from anygpt.train.cli import train_main

    for kind, overrides, extra, pattern in _bad_cases(tmp_path):
        args = list(valid_args) + overrides + ["--nproc", "2"] + extra
        if "--config" in extra:  # replace the config file, keep the rest
            i = args.index("--config")
            del args[i:i + 2]
        rc = train_main(args)
        out, err = capsys.readouterr()
        lines = err.strip().splitlines()
        assert rc == 1, kind
        assert len(lines) == 1 and lines[0].startswith("error: "), (kind, err)
        assert re.search(pattern, lines[0][len("error: "):]), (kind, lines[0])
        assert out == "", kind
        assert not (tmp_path / "run").exists(), kind


def test_existing_run_and_resume_mismatch_are_refused(tmp_path, valid_args, no_launch, capsys):
    from anygpt.train.cli import train_main

    root = tmp_path / "run" / "checkpoints"
    _fake_ckpt(root, 4, world_size=4)
    (root / POINTER).write_text(tag_for(4))
    assert train_main(valid_args + ["--nproc", "2"]) == 1
    assert "already holds checkpoints; pass --resume auto" in capsys.readouterr().err
    assert train_main(valid_args + ["--nproc", "2", "--resume", "auto"]) == 1
    assert "written by 4 ranks but this run has 2" in capsys.readouterr().err


def test_launch_script_rejects_bad_config_without_starting_ranks(tmp_path, valid_args):
    """The real entry point: one line on stderr, status 1, no torchrun output, no run directory."""
    t0 = time.time()
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), "--nproc", "2", *valid_args,
                           "optim.micro_batch_size=0"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == ["error: optim.micro_batch_size: must be > 0, got 0"]
    assert proc.stdout == "" and not (tmp_path / "run").exists()
    assert time.time() - t0 < 60


@pytest.mark.slow
def test_bench_train_reports_overhead_ratio_and_loader_headroom():
    """`anygpt bench train` on one rank (own process: it initialises a process group)."""
    code = ("import json; from anygpt.train.bench import bench_train; "
            "r = bench_train(steps=2, repeats=1, seq_len=128, micro_batch_size=2); print('RESULT', json.dumps(r))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert result["trainer_step_s"] > 0 and result["bare_step_s"] > 0
    assert result["overhead_ratio"] == pytest.approx(result["trainer_step_s"] / result["bare_step_s"])
    assert result["loader_tokens_per_s"] > 0 and result["train_tokens_per_s"] > 0
    assert "ratio trainer/bare" in proc.stdout
    assert result["chunked_head_speedup"] == pytest.approx(result["head_at_targets_step_s"] / result["chunked_head_step_s"])
    assert "chunked head and loss" in proc.stdout


@pytest.mark.slow
def test_bench_attention_shows_the_mask_bytes_each_path_saves(tmp_path):
    """`anygpt bench train`'s attention part: bytes per path, forward times, and the numbers agree."""
    from anygpt.train.bench import bench_attention

    seq_len, batch = 256, 2
    result = bench_attention(seq_len=seq_len, micro_batch_size=batch, repeats=1, workdir=tmp_path, verbose=False)
    rows = {r["path"]: r for r in result["paths"]}
    assert list(rows) == ["mask4d", "flex", "flash_varlen"] and result["examples_per_row"] > 1
    assert rows["mask4d"]["mask_bytes"] == batch * seq_len * seq_len
    assert rows["flash_varlen"]["mask_bytes"] < rows["flex"]["mask_bytes"] < rows["mask4d"]["mask_bytes"]
    assert rows["mask4d"]["forward_s"] > 0 and rows["mask4d"]["step_s"] > 0  # trains everywhere
    assert rows["flex"]["forward_s"] > 0 and rows["flex"]["loss_diff"] < 1e-5 and rows["flex"]["hidden_max_diff"] < 1e-5
    for path, row in rows.items():
        trains = unavailable(path, result["device"], training=True) is None
        assert ("step_s" in row) == trains and (trains or row["step"].startswith("skipped: "))


def test_every_stage_names_functions_that_exist():
    # The stages name their loader, checks and run as "module:function" (imported when used): a typo
    # there would surface only when a user starts that stage.
    import inspect

    from anygpt.align.cli import ALIGN_STAGE
    from anygpt.train.cli import TRAIN_STAGE, _resolve

    for stage in (TRAIN_STAGE, ALIGN_STAGE):
        load, check, run = (_resolve(r) for r in (stage.load_config, stage.preflight, stage.run))
        assert len(inspect.signature(load).parameters) >= 2 and len(inspect.signature(check).parameters) >= 3
        assert "resume" in inspect.signature(run).parameters, stage
