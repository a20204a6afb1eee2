"""Training on CPU with 2 ranks (gloo, fp32, ZeRO-3): the done-when list of the training issue.

One uninterrupted run (A) is the reference; the other runs are compared with it:

- loss falls on a tiny fixed corpus; the run directory has config, metrics, eval, TensorBoard, PNG;
- B: SIGKILL after step 5 / SIGKILL in the middle of the save of step 6 / resume -> every logged loss
  equals A's (fp32, 1e-6), and the killed save leaves the previous checkpoint loadable;
- export of A loads in plain transformers and reproduces the DeepSpeed engine's logits; ZeRO-3
  resizing keeps the original embedding rows bit-identical; a stage starting from a checkpoint gets
  exactly its weights (one 2-rank probe run, this file's ``__main__``);
- stage 2 (from A's run directory) trains only on assistant tokens;
- stage 3 LoRA trains only the adapters, and the export merges them;
- a non-finite loss on one rank skips the step on all ranks, logs the sample keys, and K in a row stop.

Ranks start through the real entry point (``launch/train.py --nproc 2``, i.e. ``torchrun``).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "launch" / "configs"
pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS = 8
COMMON = ["run.log_every=1", "run.progress=false", "run.eval_every=0", "data.seq_len=128",
          "optim.micro_batch_size=2", "optim.grad_accum=1"]


def _env(faults: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    env.pop("ANYGPT_TRAIN_FAULTS", None)
    if faults:
        env["ANYGPT_TRAIN_FAULTS"] = faults
    return env


def train(config: str, *overrides: str, resume: str | None = None, faults: str | None = None,
          expect_ok: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "launch" / "train.py"), "--nproc", "2", "--config", str(CONFIGS / config),
           *COMMON, *overrides]
    if resume:
        cmd += ["--resume", resume]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(faults), cwd=REPO, timeout=300)
    if expect_ok and proc.returncode != 0:
        pytest.fail(f"training failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from anygpt.train.bench import synthetic_corpus

    return synthetic_corpus(tmp_path_factory.mktemp("corpus"), pairs=64, conversations=32, eval_pairs=8)


@pytest.fixture(scope="module")
def tiny_args(corpus):
    return [f"model.tokenizer={corpus['tokenizer']}", f"data.sources.0.shards={corpus['pairs']}",
            f"data.eval_shards={corpus['eval']}", f"run.max_steps={STEPS}", "run.save_every=2",
            "optim.warmup_steps=2", "optim.lr=3e-3"]


@pytest.fixture(scope="module")
def run_a(tmp_path_factory, tiny_args):
    run_dir = tmp_path_factory.mktemp("runs") / "A"
    train("tiny_cpu.yaml", f"run.dir={run_dir}", *tiny_args)
    return run_dir


@pytest.fixture(scope="module")
def export_a(run_a, tmp_path_factory):
    from anygpt.train.export import export_checkpoint

    out = tmp_path_factory.mktemp("exports") / "A"
    export_checkpoint(run_a, out)
    return out


# ---------------------------------------------------------------------------- stage 1 reference run
def test_loss_falls_and_run_dir_is_complete(run_a):
    from anygpt.config import load_train_config

    rows = metrics(run_a)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    losses = [r["loss"] for r in rows]
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.5, losses
    assert all(r["loss_by_modality"] and r["lr"] > 0 and r["grad_norm"] > 0 and r["tokens_per_s"] > 0 for r in rows)
    evals = [json.loads(x) for x in (run_a / "eval.jsonl").read_text().splitlines()]
    assert evals[-1]["step"] == STEPS
    assert {"image2text", "text2image", "speech2text", "text2speech", "music2text", "text2music"} <= set(
        evals[-1]["loss_by_task"])
    cfg = load_train_config(run_a / "config.yaml")  # the resolved config re-loads as is
    assert cfg.run.dir == str(run_a) and cfg.run.max_steps == STEPS
    assert list((run_a / "tb").iterdir()) and (run_a / "loss.png").stat().st_size > 1000
    ckpts = sorted(p.name for p in (run_a / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert ckpts == ["step-00000006", "step-00000008"]  # keep_last 2
    assert (run_a / "checkpoints" / "latest").read_text() == "step-00000008"
    for name in ("vocab_layout.json", "config.yaml", "tokenizer", "hf_config", "rank00000.pt", "rank00001.pt",
                 "complete.json", "trainer_state.json"):
        assert (run_a / "checkpoints" / "step-00000008" / name).exists(), name


# ---------------------------------------------------------------------------- kill / resume
def test_sigkill_and_killed_save_resume_exactly(run_a, tiny_args, tmp_path):
    from anygpt.train.checkpoint import latest_checkpoint

    run_b = tmp_path / "B"
    root = run_b / "checkpoints"
    # 1) SIGKILL right after step 5 (last checkpoint: step 4).
    proc = train("tiny_cpu.yaml", f"run.dir={run_b}", *tiny_args, faults="kill_after_step@5", expect_ok=False)
    assert proc.returncode != 0 and latest_checkpoint(root).name == "step-00000004"
    assert [r["step"] for r in metrics(run_b)] == [1, 2, 3, 4, 5]
    # 2) resume; SIGKILL in the middle of saving step 6 (DeepSpeed shards written, not marked complete).
    proc = train("tiny_cpu.yaml", f"run.dir={run_b}", *tiny_args, resume="auto", faults="kill_during_save@6",
                 expect_ok=False)
    assert proc.returncode != 0
    assert "resumed from" in proc.stdout and "step-00000004 at step 4" in proc.stdout
    partial = root / "step-00000006"
    assert partial.is_dir() and any(partial.glob("zero_pp_rank_*")) and not (partial / "complete.json").exists()
    assert (root / "latest").read_text() == "step-00000004"  # the previous checkpoint stays the loadable one
    # 3) resume again: from step 4, to the end.
    proc = train("tiny_cpu.yaml", f"run.dir={run_b}", *tiny_args, resume="auto")
    assert "step-00000004 at step 4" in proc.stdout
    a, b = metrics(run_a), metrics(run_b)
    assert [r["step"] for r in b] == list(range(1, STEPS + 1))  # the killed timeline's extra lines are gone
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-6, rel=0), ra["step"]
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], abs=1e-6, rel=0), ra["step"]
        assert rb["lr"] == ra["lr"]
    assert (root / "latest").read_text() == "step-00000008" and (partial / "complete.json").exists()


# ---------------------------------------------------------------------------- export, resize, init-from
def test_export_reproduces_engine_logits_and_zero3_resize_keeps_rows(run_a, export_a, corpus, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    from anygpt.layout import VocabLayout
    from anygpt.model import llama_config
    from anygpt.text_tokenizer import load_tokenizer

    # A "base LLaMA" directory with only the text vocabulary, to be resized under ZeRO-3.
    raw = load_tokenizer(Path(corpus["tokenizer"]).parent / "tokenizer_raw")
    torch.manual_seed(1)
    base = LlamaForCausalLM(llama_config("tiny", len(raw), raw))
    base_dir = tmp_path / "base"
    base.save_pretrained(base_dir)
    raw.save_pretrained(base_dir)
    out = tmp_path / "probe.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
           "--probe-run", str(run_a), "--probe-base", str(base_dir), "--probe-out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    probe = torch.load(out)

    # Export: plain transformers, same logits as the DeepSpeed engine restored from the checkpoint.
    model = AutoModelForCausalLM.from_pretrained(export_a).eval()
    tok = AutoTokenizer.from_pretrained(export_a)
    layout = VocabLayout.load(export_a)
    assert len(tok) == model.config.vocab_size == layout.total
    assert json.loads((export_a / "anygpt_export.json").read_text())["step"] == STEPS
    assert {p.name for p in (export_a / "cards").iterdir()} == {"speech.yaml", "music.yaml", "image.yaml"}
    with torch.no_grad():
        logits = model(input_ids=probe["ids"]).logits
    assert torch.allclose(logits, probe["engine_logits"], atol=1e-5, rtol=0), \
        (logits - probe["engine_logits"]).abs().max()

    # ZeRO-3 resize: built partitioned, original rows bit-identical, new rows at the mean.
    assert probe["unpartitioned_after_build"] == ["lm_head.weight", "model.embed_tokens.weight"]
    assert probe["engine_partitioned"]
    n = len(raw)
    for name, weight in (("emb", base.model.embed_tokens.weight), ("head", base.lm_head.weight)):
        got = probe[name]
        assert got.shape[0] == layout.total
        assert torch.equal(got[:n], weight.detach()), name
        assert torch.allclose(got[n:], weight.detach().mean(0, keepdim=True).expand(got.shape[0] - n, -1), atol=1e-6)

    # Starting a stage from a run directory loads exactly the checkpoint's weights.
    exported = {k: v for k, v in model.state_dict().items()}
    for k, v in probe["init_from"].items():
        assert torch.equal(v, exported[k]), k


# ---------------------------------------------------------------------------- stage 2: assistant only
def _assert_assistant_only(batch: dict, layout) -> int:
    """Every target lies in an assistant turn (after ``[AnyGPT]``, up to its end token); returns their count."""
    user, assistant = layout.role_id("user"), layout.role_id("assistant")
    end = layout.role_id("assistant_end")
    ids, labels, seg = batch["input_ids"], batch["labels"], batch["segment_ids"]
    for r in range(ids.shape[0]):
        role, prev_seg = None, None
        for p in range(ids.shape[1]):
            if seg[r, p] != prev_seg:
                role, prev_seg = None, seg[r, p]
            tid = int(ids[r, p])
            if tid in (user, assistant):
                role = tid
            if labels[r, p] != -100:
                assert role == assistant and tid != assistant, (r, p, tid)
            if tid == end and role == assistant and p > 0:
                assert labels[r, p] == end  # the turn end is learned too (the model must stop)
    return int((labels[:, 1:] != -100).sum())


def test_anygpt_eval_of_the_export_equals_the_trainers_final_eval(run_a, export_a, corpus, tmp_path):
    """One held-out loss: the trainer's last eval row (2 ranks, ZeRO-3, all-reduced sums) and
    `anygpt eval` on the export (one process, other batch shape) agree on the same shards."""
    last = [json.loads(x) for x in (run_a / "eval.jsonl").read_text().splitlines()][-1]
    out = tmp_path / "eval.json"
    proc = subprocess.run([sys.executable, "-m", "anygpt.cli", "eval", "--model", str(export_a), "--data",
                           corpus["eval"], "--seq-len", "128", "--out", str(out)],
                          capture_output=True, text=True, env=_env(), cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(out.read_text())
    assert last["step"] == STEPS and got["read"]["rows"] <= 8 * 2 * 2  # the run's eval_max_batches covered it all
    assert got["tokens"] == last["tokens"] > 0
    assert got["loss"] == pytest.approx(last["loss"], abs=1e-5)
    for key in ("loss_by_task", "loss_by_modality"):
        assert set(got[key]) == set(last[key]) and len(got[key]) > 1, key
        for name, value in last[key].items():
            assert got[key][name] == pytest.approx(value, abs=1e-5), (key, name)


def test_stage2_trains_only_on_assistant_tokens(run_a, corpus, tmp_path):
    from anygpt.config import load_train_config
    from anygpt.data import build_train_loader
    from anygpt.text_tokenizer import prepare_tokenizer

    run_s = tmp_path / "S"
    train("stage2_sft.yaml", f"run.dir={run_s}", f"model.name={run_a}", f"data.sources=[{{name: sft, shards: "
          f"'{corpus['sft']}', kind: sft}}]", "data.eval_shards=null", "data.seq_len=256", "run.max_steps=2",
          "run.save_every=2", "optim.warmup_steps=1", "model.codecs=null", "data.num_workers=0",
          "model.activation_checkpointing=true")
    rows = metrics(run_s)
    assert [r["step"] for r in rows] == [1, 2] and all(set(r["loss_by_task"]) == {"sft"} for r in rows)
    # The batches both ranks trained on at step 1, rebuilt from the run's own config.
    cfg = load_train_config(run_s / "config.yaml")
    tok, layout = prepare_tokenizer(run_a / "checkpoints" / "step-00000008" / "tokenizer")
    targets = 0
    for rank in range(2):
        loader = build_train_loader(cfg, tok, layout, rank, 2)
        targets += _assert_assistant_only(next(loader), layout)
        loader.close()
    assert rows[0]["loss_tokens"] == targets > 0
    # Started from stage 1's weights, not from scratch (random init is ~ln(vocab) = 9.78).
    assert rows[0]["loss"] < 9.5


# ---------------------------------------------------------------------------- stage 3: LoRA
def test_lora_trains_only_adapters_and_export_merges(export_a, corpus, tmp_path):
    from safetensors.torch import load_file

    from anygpt.train.checkpoint import resolve_checkpoint
    from anygpt.train.export import consolidated_state_dict, export_checkpoint

    run_l = tmp_path / "L"
    proc = train("stage3_lora.yaml", f"run.dir={run_l}", f"model.name={export_a}", f"data.sources=[{{name: com, "
                 f"shards: '{corpus['sft']}', kind: sft}}]", "data.eval_shards=null", "data.seq_len=256",
                 "run.max_steps=2", "run.save_every=2", "optim.warmup_steps=1", "optim.lr=1e-2", "model.codecs=null",
                 "data.num_workers=0", "model.lora.dropout=0.0")
    m = re.search(r"([\d.]+)M params, ([\d.]+)M trainable \(LoRA\)", proc.stdout)
    assert m and float(m.group(2)) < 0.05 * float(m.group(1)), proc.stdout[:2000]
    state = consolidated_state_dict(resolve_checkpoint(run_l))
    base = load_file(export_a / "model.safetensors")
    prefix = "base_model.model."
    lora = {k: v for k, v in state.items() if "lora_" in k}
    frozen = {k[len(prefix):].replace(".base_layer", ""): v for k, v in state.items() if "lora_" not in k}
    assert set(frozen) == set(base)
    assert all(torch.equal(v, base[k]) for k, v in frozen.items())  # base weights untouched
    assert any(v.abs().max() > 0 for k, v in lora.items() if "lora_B" in k)  # adapters trained (B starts at 0)

    out = tmp_path / "export_L"
    record = export_checkpoint(run_l, out)
    assert record["lora_merged"]
    merged = load_file(out / "model.safetensors")
    assert set(merged) == set(base)  # plain weights, no adapter tensors
    k = "model.layers.0.self_attn.q_proj"
    a, b = lora[f"{prefix}{k}.lora_A.default.weight"], lora[f"{prefix}{k}.lora_B.default.weight"]
    assert torch.allclose(merged[k + ".weight"], base[k + ".weight"] + b @ a * (32 / 16), atol=1e-6)
    for untouched in ("model.norm.weight", "model.embed_tokens.weight", "lm_head.weight"):  # not LoRA targets
        assert torch.equal(merged[untouched], base[untouched]), untouched
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)


# ---------------------------------------------------------------------------- non-finite loss
def test_nonfinite_loss_skips_on_all_ranks_and_streak_stops(tiny_args, tmp_path):
    run_n = tmp_path / "N"
    proc = train("tiny_cpu.yaml", f"run.dir={run_n}", *tiny_args, "run.max_nonfinite=2", "data.eval_shards=null",
                 faults="nan_loss@2:1,nan_loss@4,nan_loss@5", expect_ok=False)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: stopped at step 5: 2 steps in a row had a non-finite loss")
    rows = {r["step"]: r for r in metrics(run_n)}
    assert sorted(rows) == [1, 2, 3, 4, 5]
    for s in (2, 4, 5):
        assert rows[s]["skipped"] and rows[s]["loss"] is None and rows[s]["nonfinite_keys"], rows[s]
    assert all(k.startswith("pairs/") for k in rows[2]["nonfinite_keys"])
    # Step 2 was skipped on both ranks although only rank 1 saw NaN: the schedule did not advance,
    # so step 3 ran at the rate step 2 would have used.
    assert rows[3]["lr"] == pytest.approx(3e-3) and rows[1]["lr"] == pytest.approx(1.5e-3)
    assert "step 2: non-finite loss; update skipped" in proc.stdout


# ---------------------------------------------------------------------------- 2-rank probe (torchrun)
def _probe(run_dir: Path, base_dir: Path, out: Path) -> None:
    """Runs on 2 ranks: engine logits from A's last checkpoint, ZeRO-3 resize, init-from-checkpoint."""
    import deepspeed

    from anygpt.config import load_train_config
    from anygpt.text_tokenizer import prepare_tokenizer
    from anygpt.train.checkpoint import CheckpointManager, resolve_checkpoint
    from anygpt.train.dsconfig import resolve_ds_config
    from anygpt.train.engine import build_engine, build_model, init_runtime, resolve_model_source

    rt = init_runtime()
    result: dict = {}
    ckpt = resolve_checkpoint(run_dir)
    cfg = load_train_config(ckpt / "config.yaml")
    ds = resolve_ds_config(cfg, rt.world_size, rt.cuda)
    tok, layout = prepare_tokenizer(ckpt / "tokenizer")
    bundle = build_engine(cfg, resolve_model_source(cfg), tok, layout, ds, rt)
    CheckpointManager(run_dir, 2, rt.rank, rt.world_size).load(bundle.engine, ckpt)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, layout.total, (2, 24), generator=gen)
    bundle.engine.eval()
    with torch.no_grad():
        result["engine_logits"] = bundle.engine(input_ids=ids).logits.float().cpu()
    result["ids"] = ids

    def gathered(model, names):
        params = dict(model.named_parameters())
        with deepspeed.zero.GatheredParameters([params[n] for n in names]):
            return {n: params[n].detach().clone() for n in names}

    # ZeRO-3 resize of a base directory with only the text vocabulary.
    base_cfg = load_train_config(ckpt / "config.yaml", [f"model.name={base_dir}", "model.tokenizer=null"])
    base_tok, base_layout = prepare_tokenizer(base_dir)
    model, keep = build_model(base_cfg, resolve_model_source(base_cfg), base_tok, base_layout, ds, rt)
    # Built partitioned (zero.Init) except the two matrices transformers re-creates when resizing (whole,
    # identical on every rank); deepspeed.initialize partitions those.
    result["unpartitioned_after_build"] = sorted(n for n, p in model.named_parameters() if not hasattr(p, "ds_id"))
    result["engine_partitioned"] = all(hasattr(p, "ds_id") for p in bundle.engine.module.parameters())
    w = gathered(model, ["model.embed_tokens.weight", "lm_head.weight"])
    result["emb"], result["head"] = w["model.embed_tokens.weight"], w["lm_head.weight"]
    # A stage that starts from A's run directory.
    init_cfg = load_train_config(ckpt / "config.yaml", [f"model.name={run_dir}", "model.tokenizer=null"])
    source = resolve_model_source(init_cfg)
    assert source.kind == "checkpoint"
    model2, keep2 = build_model(init_cfg, source, tok, layout, ds, rt)
    result["init_from"] = gathered(model2, [n for n, _ in model2.named_parameters()])
    if rt.is_main:
        torch.save(result, out)
    torch.distributed.barrier()


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--probe-run", type=Path, required=True)
    ap.add_argument("--probe-base", type=Path, required=True)
    ap.add_argument("--probe-out", type=Path, required=True)
    a = ap.parse_args()
    _probe(a.probe_run, a.probe_base, a.probe_out)
