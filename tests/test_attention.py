"""Attention paths for packed rows: each path's forward (logits and loss) equals the 4-D mask's on packed
rows with several examples per row and padding; the flash-attn varlen kwargs through transformers' own
flash integration (with a plain-torch kernel of flash_attn's varlen contract, on CPU); gradients on a GPU;
mask bytes; which path `auto` picks and why a path is refused."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from anygpt import attention as attn
from anygpt.config import ConfigError
from anygpt.data import TASK_NAMES
from anygpt.data.examples import Example
from anygpt.data.packing import collate_rows
from anygpt.train.losses import TokenLoss, lm_loss

L = 200  # two FlexAttention tiles of 128, the second one partial
REPO = Path(__file__).resolve().parents[1]


def packed_batch(vocab: int, seed: int = 0) -> dict:
    """Rows: four examples + padding, one example + padding, two examples filling the row exactly, all padding."""
    rng = np.random.default_rng(seed)

    def ex(n: int, i: int) -> Example:
        ids = rng.integers(3, vocab, n)
        ids[0] = 1
        mask = rng.random(n) < 0.7
        return Example(ids.astype(np.int64), mask, f"e{i}", int(rng.integers(1, len(TASK_NAMES))))

    rows = [[ex(13, 0), ex(7, 1), ex(21, 2), ex(90, 3)], [ex(150, 4)], [ex(120, 5), ex(80, 6)], []]
    return collate_rows(rows, L, pad_id=0)


@pytest.fixture(scope="module")
def model(tiny_tokenizer, tiny_layout):
    from anygpt.model import build_model

    return build_model("tiny", tiny_layout, tiny_tokenizer, seed=0).eval()


@pytest.fixture(scope="module")
def loss_fn(tiny_layout):
    return TokenLoss(tiny_layout, TASK_NAMES, torch.device("cpu"))


def _forward(model, loss_fn, batch, path, device="cpu"):
    """Full logits and the trainer's loss (LM head only at targets) through ``path``."""
    inputs = attn.attention_inputs(batch, path, device)
    logits = model(**inputs).logits
    loss = lm_loss(model, model, inputs, batch, loss_fn)[0]
    return logits, loss


def reference_flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
                                     dropout_p=0.0, softmax_scale=None, causal=False):
    """flash_attn.flash_attn_varlen_func's contract in plain torch: ``q/k/v [total, heads, dim]``, sequence
    ``i`` spans ``cu_seqlens[i]:cu_seqlens[i + 1]`` and attends only within itself (causally if asked)."""
    assert torch.equal(cu_seqlens_q, cu_seqlens_k) and int(cu_seqlens_q.diff().max()) == max_seqlen_q
    rep = q.shape[1] // k.shape[1]
    bounds = cu_seqlens_q.tolist()
    outs = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (t[s:e].transpose(0, 1) for t in (q, k, v))
        outs.append(F.scaled_dot_product_attention(qs, ks.repeat_interleave(rep, 0), vs.repeat_interleave(rep, 0),
                                                   is_causal=causal, scale=softmax_scale).transpose(0, 1))
    return torch.cat(outs)


def patch_flash_with_reference(setattr_) -> None:
    """transformers' real ``flash_attention_2`` code path, its kernel import replaced by the reference above."""
    import transformers.modeling_flash_attention_utils as mfa

    for name in ("_loaded_implementation", "_flash_fn", "_flash_varlen_fn", "_flash_with_kvcache_fn", "_pad_fn",
                 "_unpad_fn", "_process_flash_kwargs_fn", "_process_with_kvcache_kwargs_fn"):
        setattr_(mfa, name, None)
    setattr_(mfa, "_lazy_imports", lambda *a, **k: (None, reference_flash_attn_varlen_func, None, None, None))


@pytest.fixture
def flash_on_cpu(monkeypatch):
    patch_flash_with_reference(monkeypatch.setattr)


def _use(model, impl):
    # set_attn_implementation refuses flash_attention_2 without the package; the internal field is what
    # the attention layers read.
    model.config._attn_implementation_internal = impl


def test_varlen_lengths_cover_each_example_and_each_padding_run(tiny_layout):
    batch = packed_batch(tiny_layout.total)
    cu, longest = attn.varlen_lengths(batch["segment_ids"])
    # row 0: 13, 7, 21, 90, padding 69 | row 1: 150, padding 50 | row 2: 120, 80 | row 3: padding 200
    lengths = [13, 7, 21, 90, 69, 150, 50, 120, 80, 200]
    assert cu.dtype == torch.int32 and cu.tolist() == np.cumsum([0] + lengths).tolist() and longest == 200


def test_flash_varlen_through_transformers_flash_path_equals_mask4d(model, loss_fn, tiny_layout, flash_on_cpu):
    """Forward logits and loss to 1e-5, and gradients, with activation checkpointing on."""
    batch = packed_batch(tiny_layout.total)
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    results = {}
    try:
        for path in ("mask4d", "flash_varlen"):
            _use(model, attn.HF_IMPLEMENTATION[path])
            model.zero_grad(set_to_none=True)
            logits, loss = _forward(model, loss_fn, batch, path)
            loss.backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
            results[path] = (logits.detach(), loss.detach(), grads)
    finally:
        _use(model, "sdpa")
        model.gradient_checkpointing_disable()
        model.eval().zero_grad(set_to_none=True)
    (ref_logits, ref_loss, ref_grads), (logits, loss, grads) = results["mask4d"], results["flash_varlen"]
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-5)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=name)
    # Not vacuous: one causal sequence per row (what a kernel without the lengths would do) differs.
    with torch.no_grad():
        assert (model(input_ids=batch["input_ids"]).logits - ref_logits).abs().max() > 1e-2


@pytest.mark.slow
def test_flex_forward_equals_mask4d_on_cpu(model, loss_fn, tiny_layout):
    """transformers' flex_attention with our BlockMask (compiled on first use: ~20 s on 2 cores)."""
    batch = packed_batch(tiny_layout.total, seed=1)
    with torch.no_grad():
        ref_logits, ref_loss = _forward(model, loss_fn, batch, "mask4d")
        with attn.using_attention(model, "flex"):
            assert model.config._attn_implementation == "flex_attention"
            logits, loss = _forward(model, loss_fn, batch, "flex")
    assert model.config._attn_implementation == "sdpa"  # restored
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-5)


def test_mask_bytes_per_path(tiny_layout):
    batch = packed_batch(tiny_layout.total)
    sizes = {p: attn.mask_nbytes(attn.attention_inputs(batch, p, "cpu")) for p in attn.PATHS}
    assert sizes["mask4d"] == 4 * L * L  # one bool per (query, key) pair and row
    assert sizes["flash_varlen"] == 4 * 11  # int32 cumulative lengths of the 10 runs
    assert sizes["flash_varlen"] < sizes["flex"] < sizes["mask4d"] / 4


def test_auto_takes_the_first_path_that_trains_here(monkeypatch):
    assert attn.resolve_attention("auto", "cpu") == "mask4d"
    for trains, expected in (({"mask4d", "flex", "flash_varlen"}, "flash_varlen"), ({"mask4d", "flex"}, "flex")):
        monkeypatch.setattr(attn, "unavailable", lambda p, d, training=True, ok=trains: None if p in ok else "no")
        assert attn.resolve_attention("auto", "cuda") == expected


def test_a_path_that_cannot_run_here_is_one_config_line():
    with pytest.raises(ConfigError, match=r"^model\.attention: flash_varlen needs a CUDA GPU .*; use mask4d or auto$"):
        attn.resolve_attention("flash_varlen", "cpu")
    with pytest.raises(ConfigError, match=r"^--attention: 'flash' is not one of \['auto', 'mask4d', 'flex', "):
        attn.resolve_attention("flash", "cpu", key="--attention")
    if attn.unavailable("flex", "cpu", training=True) is not None:  # torch 2.13: no FlexAttention backward on CPU
        with pytest.raises(ConfigError, match=r"^model\.attention: flex cannot train on cpu"):
            attn.resolve_attention("flex", "cpu")
    assert attn.resolve_attention("flex", "cpu", training=False) == "flex"  # forward (eval) is fine
    if importlib.util.find_spec("flash_attn") is None:
        assert attn.unavailable("flash_varlen", "cuda").startswith("needs the flash_attn package")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("path", ["flex", "flash_varlen"])
def test_gradients_equal_mask4d_on_gpu(path, tiny_tokenizer, tiny_layout):
    """Loss and gradients of the packed batch through ``path`` vs the 4-D mask, same model and dtype."""
    from anygpt.model import build_model

    reason = attn.unavailable(path, "cuda", training=True)
    if reason:
        pytest.skip(reason)
    # flash-attn runs in bf16/fp16 only: compare it with the 4-D mask in bf16; flex in fp32.
    dtype, tol = (torch.bfloat16, 2e-2) if path == "flash_varlen" else (torch.float32, 1e-3)
    model = build_model("tiny", tiny_layout, tiny_tokenizer, dtype=dtype, seed=0).cuda().train()
    loss_fn = TokenLoss(tiny_layout, TASK_NAMES, torch.device("cuda"))
    batch = packed_batch(tiny_layout.total)
    results = {}
    for p in ("mask4d", path):
        attn.set_attention(model, p)
        model.zero_grad(set_to_none=True)
        logits, loss = _forward(model, loss_fn, batch, p, "cuda")
        loss.backward()
        results[p] = (logits.float().detach(), loss.detach(), {n: q.grad.float() for n, q in model.named_parameters()})
    (ref_logits, ref_loss, ref_grads), (logits, loss, grads) = results["mask4d"], results[path]
    assert abs(float(loss - ref_loss)) <= tol * abs(float(ref_loss))
    assert float((logits - ref_logits).norm() / ref_logits.norm()) <= tol
    for name, g in ref_grads.items():
        assert float((grads[name] - g).norm()) <= tol * float(g.norm()) + 1e-6, name


@pytest.mark.slow
def test_every_path_through_the_zero3_engine_on_cpu(tmp_path):
    """One rank, ZeRO-3 (gloo): the DeepSpeed engine's hooks pass the BlockMask and the varlen kwargs through,
    with the LM head at targets and activation checkpointing; flash_varlen also trains a step there."""
    out = tmp_path / "probe.json"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, __file__, "--zero3-probe", str(out)], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    r = json.loads(out.read_text())
    assert r["implementations"] == ["sdpa", "flex_attention", "flash_attention_2"]
    for path in ("flex", "flash_varlen"):
        assert abs(r["loss"][path] - r["loss"]["mask4d"]) < 1e-5, r
    assert r["flash_step_applied"] and r["flash_step_loss"] == pytest.approx(r["loss"]["mask4d"], abs=1e-5)


def _zero3_probe(out: Path) -> None:
    import tempfile

    from conftest import make_tiny_tokenizer

    from anygpt.config import load_train_config
    from anygpt.text_tokenizer import prepare_tokenizer
    from anygpt.train.dsconfig import resolve_ds_config
    from anygpt.train.engine import build_engine, init_runtime, resolve_model_source

    patch_flash_with_reference(setattr)
    tok_dir = make_tiny_tokenizer(Path(tempfile.mkdtemp()))
    cfg = load_train_config(None, base={
        "model": {"name": "tiny", "tokenizer": str(tok_dir), "activation_checkpointing": True},
        "data": {"sources": [{"name": "unused", "shards": "unused"}], "seq_len": L}, "optim": {"warmup_steps": 0}})
    rt = init_runtime()
    tok, layout = prepare_tokenizer(tok_dir)
    engine = build_engine(cfg, resolve_model_source(cfg), tok, layout, resolve_ds_config(cfg, 1, False), rt).engine
    loss_fn = TokenLoss(layout, TASK_NAMES, rt.device)
    batch = packed_batch(layout.total)
    result: dict = {"loss": {}, "implementations": []}
    engine.eval()
    for path in attn.PATHS:
        if path == "flash_varlen":
            _use(engine.module, "flash_attention_2")
        else:
            attn.set_attention(engine.module, path)
        result["implementations"].append(engine.module.config._attn_implementation)
        with torch.no_grad():
            loss = lm_loss(engine, engine.module, attn.attention_inputs(batch, path, rt.device), batch, loss_fn)[0]
        result["loss"][path] = float(loss)
    engine.train()  # still flash_attention_2 (reference kernel): a whole step under ZeRO-3 with checkpointing
    loss = lm_loss(engine, engine.module, attn.attention_inputs(batch, "flash_varlen", rt.device), batch, loss_fn)[0]
    engine.backward(loss)
    engine.step()
    result["flash_step_loss"], result["flash_step_applied"] = float(loss), bool(engine.was_step_applied())
    out.write_text(json.dumps(result))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--zero3-probe"]:
        _zero3_probe(Path(sys.argv[2]))
