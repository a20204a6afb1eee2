"""SoundStorm acoustic decoder: training signal, decoding contract, release checkpoint layout, trainer."""
from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch

from anygpt.decoders.soundstorm import (
    SoundStorm,
    SoundStormConfig,
    SoundStormLoadError,
)

Q = 8  # SpeechTokenizer RVQ layers
C = 1024  # codes per layer
REPO = Path(__file__).resolve().parents[1]


def structured_codes(batch: int, frames: int, seed: int = 0) -> torch.Tensor:
    """Codes whose acoustic layers are a fixed function of the semantic id: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    sem = torch.randint(0, C, (batch, frames), generator=g)
    acoustic = [(sem * (7 + 2 * k) + 13 * k) % C for k in range(Q - 1)]
    return torch.cat([sem[:, None], torch.stack(acoustic, dim=1)], dim=1)


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    # These models are tiny: on a shared 2-core machine, intra-op threads mostly contend with each other
    # (measured 1 s with 1 thread vs 7 s with 2 for the training test under load).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model() -> SoundStorm:
    torch.manual_seed(0)
    return SoundStorm(SoundStormConfig.tiny()).eval()


# -- training -----------------------------------------------------------------------------------------


def test_training_lowers_loss() -> None:
    torch.manual_seed(0)
    m = SoundStorm(SoundStormConfig.tiny())
    codes = structured_codes(4, 40)
    lengths = torch.tensor([40, 40, 33, 25])
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(60):
        loss, stats = m.loss(codes, lengths, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(stats["loss"])
        assert stats["masked"] >= 4  # at least one masked target per utterance
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert first > 6.0  # ~ln(1024) at init
    assert last < 0.6 * first, (first, last)


def test_loss_rejects_bad_codes(model: SoundStorm) -> None:
    codes = structured_codes(2, 10)
    with pytest.raises(ValueError, match=r"\[B, 8, T\]"):
        model.loss(codes[:, :4])
    bad = codes.clone()
    bad[0, 3, 2] = C
    with pytest.raises(ValueError, match="acoustic codes must be in"):
        model.loss(bad)
    # Out-of-range values in the padding are fine: they are never looked at.
    bad = codes.clone()
    bad[1, :, 8:] = -1
    loss, _ = model.loss(bad, lengths=[10, 8])
    assert torch.isfinite(loss)


# -- decoding -----------------------------------------------------------------------------------------


def test_generate_contract(model: SoundStorm) -> None:
    sem = structured_codes(3, 30)[:, 0]
    out = model.generate(sem, seed=1)
    assert out.shape == (3, Q, 30) and out.dtype == torch.long
    assert torch.equal(out[:, 0], sem)
    assert int(out.min()) >= 0 and int(out.max()) < C
    # one utterance as a plain [T] sequence
    single = model.generate(sem[0].numpy(), steps=[4, 2, 1], seed=1)
    assert single.shape == (1, Q, 30)


def test_generate_seed_reproducible(model: SoundStorm) -> None:
    sem = structured_codes(2, 25)[:, 0]
    a = model.generate(sem, seed=7)
    b = model.generate(sem, seed=7)
    c = model.generate(sem, seed=8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    model.generate(sem)  # fresh seed, recorded
    assert isinstance(model.last_seed, int)


def test_voice_prompt_kept_and_used(model: SoundStorm) -> None:
    codes = structured_codes(1, 40, seed=3)[0]
    prompt_a, prompt_b = codes[:, :15], structured_codes(1, 15, seed=4)[0]
    sem = structured_codes(2, 20, seed=5)[:, 0]
    full = model.generate(sem, prompt=prompt_a, seed=2, include_prompt=True)
    assert full.shape == (2, Q, 35)
    assert torch.equal(full[0, :, :15], prompt_a) and torch.equal(full[1, :, :15], prompt_a)
    out = model.generate(sem, prompt=prompt_a, seed=2)
    assert out.shape == (2, Q, 20)
    assert torch.equal(out, full[:, :, 15:])
    assert torch.equal(out[:, 0], sem)
    # the continuation depends on the prompt (it is attended to, not ignored)
    other = model.generate(sem, prompt=prompt_b, seed=2)
    assert not torch.equal(out, other)
    with pytest.raises(ValueError, match="prompt must be codes"):
        model.generate(sem, prompt=prompt_a[:1])


def test_batched_padding_matches_single(model: SoundStorm) -> None:
    sem = structured_codes(2, 24, seed=6)[:, 0]
    lengths = torch.tensor([24, 17])
    batched = model.generate(sem, lengths=lengths, temperature=0, steps=[3, 1])
    alone = model.generate(sem[1:, :17], temperature=0, steps=[3, 1])
    assert torch.equal(batched[1, :, :17], alone[0])
    assert int(batched[1, 1:, 17:].abs().sum()) == 0


# -- persistence --------------------------------------------------------------------------------------


def test_save_load_round_trip(model: SoundStorm, tmp_path: Path) -> None:
    model.save_pretrained(tmp_path / "ss")
    assert json.loads((tmp_path / "ss" / "config.json").read_text())["dim"] == model.config.dim
    loaded = SoundStorm.from_pretrained(tmp_path / "ss")
    assert loaded.config == model.config
    codes = structured_codes(2, 12)
    ac = codes[:, 1:].clone()
    ac[:, 3:] = C  # some mask tokens
    with torch.no_grad():
        assert torch.equal(model(ac, codes[:, 0]), loaded(ac, codes[:, 0]))
    assert torch.equal(model.generate(codes[:, 0], seed=3), loaded.generate(codes[:, 0], seed=3))


def test_from_pretrained_errors(model: SoundStorm, tmp_path: Path) -> None:
    with pytest.raises(SoundStormLoadError, match="missing config.json, model.safetensors"):
        SoundStorm.from_pretrained(tmp_path)
    model.save_pretrained(tmp_path / "ss")
    cfg = json.loads((tmp_path / "ss" / "config.json").read_text())
    cfg["depth"] = 3
    (tmp_path / "ss" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SoundStormLoadError, match=r"missing layers\.2\."):
        SoundStorm.from_pretrained(tmp_path / "ss")


# -- the AnyGPT release checkpoint layout -------------------------------------------------------------


def release_shapes(dim: int = 1024, depth: int = 12, heads: int = 8, dim_head: int = 128, ff_mult: int = 4,
                   conv_expansion: int = 2, kernel: int = 31, codebook: int = 1024, num_acoustic: int = 7,
                   semantic: int = 1024, conv_layout: str = "anygpt") -> dict[str, tuple[int, ...]]:
    """State-dict keys and shapes of AnyGPT's SoundStorm, derived from its release code.

    soundstorm_speechtokenizer/soundstorm.py in OpenMOSS/AnyGPT, built as in anygpt/src/infer/voice_clone.py:
    ConformerWrapper(codebook_size=1024, num_quantizers=7, conformer={dim 1024, depth 12, heads 8,
    dim_head 128}) inside SoundStorm(num_semantic_token_ids=1024).  ConformerBlock wraps ff1/ff2 as
    Scale(PreNorm(FeedForward)) and attn as PreNorm(Attention); AnyGPT's conv module is
    net1 = [LayerNorm, Rearrange, Conv1d, GLU], ds_conv = DepthWiseConv1d, net2 = [Swish, ChanLayerNorm,
    Conv1d, Rearrange, Dropout]; upstream soundstorm-speechtokenizer keeps one Sequential `net`.
    The logits EinMix stores its bias broadcast over the output 'b n gq l' -> [1, 1, gq, l].
    """
    inner, conv_inner, ff = heads * dim_head, dim * conv_expansion, dim * ff_mult
    conv = {
        "anygpt": {"net1.0": "ln", "net1.2": "in", "ds_conv.conv": "dw", "net2.1": "gamma", "net2.2": "out"},
        "upstream": {"net.0": "ln", "net.2": "in", "net.4.conv": "dw", "net.6": "gamma", "net.7": "out"},
    }[conv_layout]
    conv_shapes = {
        "ln": {"weight": (dim,), "bias": (dim,)},
        "in": {"weight": (conv_inner * 2, dim, 1), "bias": (conv_inner * 2,)},
        "dw": {"weight": (conv_inner, 1, kernel), "bias": (conv_inner,)},
        "gamma": {"gamma": (1, conv_inner, 1)},
        "out": {"weight": (dim, conv_inner, 1), "bias": (dim,)},
    }
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(depth):
        p = f"net.conformer.layers.{i}."
        for f in ("ff1", "ff2"):
            shapes[p + f + ".fn.fn.net.0.weight"] = (ff, dim)
            shapes[p + f + ".fn.fn.net.0.bias"] = (ff,)
            shapes[p + f + ".fn.fn.net.3.weight"] = (dim, ff)
            shapes[p + f + ".fn.fn.net.3.bias"] = (dim,)
            shapes[p + f + ".fn.norm.weight"] = (dim,)
            shapes[p + f + ".fn.norm.bias"] = (dim,)
        shapes[p + "attn.fn.to_q.weight"] = (inner, dim)
        shapes[p + "attn.fn.to_kv.weight"] = (inner * 2, dim)
        shapes[p + "attn.fn.to_out.weight"] = (dim, inner)
        shapes[p + "attn.fn.to_out.bias"] = (dim,)
        shapes[p + "attn.norm.weight"] = (dim,)
        shapes[p + "attn.norm.bias"] = (dim,)
        for name, kind in conv.items():
            for leaf, shape in conv_shapes[kind].items():
                shapes[f"{p}conv.{name}.{leaf}"] = shape
        shapes[p + "post_norm.weight"] = (dim,)
        shapes[p + "post_norm.bias"] = (dim,)
    shapes["net.code_embeds.weight"] = ((codebook + 1) * num_acoustic, dim)
    shapes["net.heads.0.weight"] = (dim * num_acoustic, dim)
    shapes["net.heads.0.bias"] = (dim * num_acoustic,)
    shapes["net.to_logits.0.weight"] = (dim,)
    shapes["net.to_logits.0.bias"] = (dim,)
    shapes["net.to_logits.2.weight"] = (num_acoustic, dim, codebook)
    shapes["net.to_logits.2.bias"] = (1, 1, num_acoustic, codebook)
    shapes["semantic_token_emb.weight"] = (semantic, dim)
    return shapes


@pytest.mark.parametrize("layout", ["anygpt", "upstream"])
def test_release_layout_real_size_strict(layout: str) -> None:
    # Meta tensors: checks every key name and shape at the real 350 M-parameter size without allocating it.
    shapes = release_shapes(conv_layout=layout)
    assert len(shapes) == 356
    state = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    m = SoundStorm.load_anygpt_release(state, dtype=None)
    assert m.config == SoundStormConfig.anygpt_release()
    assert m.layers[11].conv.depthwise.weight.shape == (2048, 1, 31)
    assert m.head_bias.shape == (7, 1024)


def test_release_file_loads_and_keeps_values(tmp_path: Path) -> None:
    cfg = SoundStormConfig.tiny()
    shapes = release_shapes(dim=cfg.dim, depth=cfg.depth, heads=cfg.heads, dim_head=cfg.dim_head,
                            ff_mult=cfg.ff_mult, conv_expansion=cfg.conv_expansion, kernel=cfg.conv_kernel_size)
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(s, generator=g) * 0.05 for k, s in shapes.items()}
    torch.save(state, tmp_path / "speechtokenizer_soundstorm_mls.pt")
    m = SoundStorm.load_anygpt_release(tmp_path / "speechtokenizer_soundstorm_mls.pt", heads=cfg.heads)
    assert m.config == cfg
    assert torch.equal(m.layers[1].conv.depthwise.weight, state["net.conformer.layers.1.conv.ds_conv.conv.weight"])
    assert torch.equal(m.layers[0].conv.chan_norm_gamma, state["net.conformer.layers.0.conv.net2.1.gamma"])
    assert torch.equal(m.head_bias, state["net.to_logits.2.bias"][0, 0])
    assert torch.equal(m.semantic_emb.weight, state["semantic_token_emb.weight"])
    out = m.generate(torch.arange(20) * 37 % C, seed=0)
    assert out.shape == (1, Q, 20)


def test_release_wrong_keys_named() -> None:
    cfg = SoundStormConfig.tiny()
    shapes = release_shapes(dim=cfg.dim, depth=cfg.depth, heads=cfg.heads, dim_head=cfg.dim_head,
                            ff_mult=cfg.ff_mult, conv_expansion=cfg.conv_expansion, kernel=cfg.conv_kernel_size)
    state = {k: torch.zeros(s) for k, s in shapes.items()}
    del state["net.conformer.layers.1.conv.net2.2.bias"]
    state["net.conformer.rel_pos_bias.relative_attention_bias.weight"] = torch.zeros(32, 2)
    with pytest.raises(SoundStormLoadError) as err:
        SoundStorm.load_anygpt_release(state, heads=cfg.heads)
    message = str(err.value)
    assert "\n" not in message
    assert "missing layers.1.conv.pointwise_out.bias" in message
    assert "unexpected net.conformer.rel_pos_bias.relative_attention_bias.weight" in message
    with pytest.raises(SoundStormLoadError, match="not found"):
        SoundStorm.load_anygpt_release("/nonexistent/speechtokenizer_soundstorm_mls.pt")


# -- trainer ------------------------------------------------------------------------------------------


def write_shard(path: Path, n: int = 6) -> None:
    import webdataset as wds

    pattern = str(path / "speech-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=1000) as sink:
        for i in range(n):
            codes = structured_codes(1, 20 + 7 * i, seed=i)[0].numpy()
            sink.write({"__key__": f"utt{i:03d}", "speech.npy": codes, "json": {"text": f"utterance {i}"}})
        # rows the trainer must skip: no speech at all, and layer-1-only speech
        sink.write({"__key__": "textonly", "json": {"text": "no audio here"}})
        sink.write({"__key__": "semonly", "speech.npy": np.zeros((1, 30), dtype=np.int64)})
        # conversation-style keys that end in speech.npy count too
        sink.write({"__key__": "dialog", "m1.speech.npy": structured_codes(1, 30, seed=99)[0].numpy()})


def test_trainer_on_tiny_shard(tmp_path: Path) -> None:
    from anygpt.decoders.train_soundstorm import train_soundstorm

    write_shard(tmp_path)
    summary = train_soundstorm([str(tmp_path / "speech-{000000..000000}.tar")], tmp_path / "run", steps=6,
                               batch_size=3, lr=1e-3, max_frames=32, seed=0, device="cpu",
                               config=SoundStormConfig.tiny(), progress=False, log_every=2)
    assert summary["steps"] == 6 and np.isfinite(summary["final_loss"])
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["step"] == 6 and "loss" in lines[-1]
    loaded = SoundStorm.from_pretrained(tmp_path / "run")
    assert loaded.generate(torch.arange(10), seed=0).shape == (1, Q, 10)

    # the launch script is a thin wrapper over the same function
    spec = importlib.util.spec_from_file_location("launch_train_soundstorm", REPO / "launch" / "train_soundstorm.py")
    assert spec and spec.loader
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    first_line = (REPO / "launch" / "train_soundstorm.py").read_text().splitlines()[0]
    assert first_line.startswith("# python launch/train_soundstorm.py ")
    rc = script.main(["--shards", str(tmp_path / "speech-000000.tar"), "--out", str(tmp_path / "run2"),
                      "--steps", "2", "--batch-size", "2", "--max-frames", "16", "--tiny", "--device", "cpu",
                      "--no-progress"])
    assert rc == 0 and (tmp_path / "run2" / "model.safetensors").is_file()


def test_trainer_errors(tmp_path: Path) -> None:
    import webdataset as wds

    from anygpt.decoders.train_soundstorm import train_soundstorm

    with pytest.raises(FileNotFoundError, match="shard not found"):
        train_soundstorm([str(tmp_path / "missing.tar")], tmp_path / "run", steps=1, device="cpu",
                         config=SoundStormConfig.tiny(), progress=False)
    with wds.ShardWriter(str(tmp_path / "text-%06d.tar")) as sink:
        sink.write({"__key__": "a", "json": {"text": "hi"}})
    with pytest.raises(ValueError, match="no sample with a"):
        train_soundstorm([str(tmp_path / "text-000000.tar")], tmp_path / "run", steps=1, device="cpu",
                         config=SoundStormConfig.tiny(), progress=False)


def test_sample_reader_accepts_npy_bytes() -> None:
    from anygpt.decoders.train_soundstorm import speech_codes_from_sample

    codes = structured_codes(1, 9)[0].numpy()
    buf = io.BytesIO()
    np.save(buf, codes)
    # conversation shards hold one array per turn: m0.speech.npy, m2.speech.npy, ...
    got = speech_codes_from_sample({"__key__": "x", "m0.speech.npy": buf.getvalue(), "m1.image.npy": b"",
                                    "m2.speech.npy": codes[:, :4]}, Q)
    assert len(got) == 2 and np.array_equal(got[0], codes) and np.array_equal(got[1], codes[:, :4])
    assert speech_codes_from_sample({"__key__": "x", "image.npy": buf.getvalue()}, Q) == []
