"""SoundStorm acoustic decoder: training signal, decoding contract, codec cards, checkpoint loading
(release layout, unused keys), and its trainer (config schema, data, exact resume, command line)."""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from anygpt.config import ConfigError
from anygpt.data.schema import MediaItem, encode_sample
from anygpt.decoders.soundstorm import (
    SoundStorm,
    SoundStormConfig,
    SoundStormLoadError,
    acoustic_modality,
)
from anygpt.modalities import codec_card
from data_pipeline.shards import ChunkWriter

Q = 8  # SpeechTokenizer RVQ layers
C = 1024  # codes per layer
REPO = Path(__file__).resolve().parents[1]
SPEECH = acoustic_modality()  # asked of the registry, as the library does
CARD = codec_card(SPEECH)  # the default speech codec (SpeechTokenizer): 8 x 1024 at 50 Hz
# Another RVQ codec's card (Mimi-like: fewer, smaller codebooks at 12.5 Hz, two of them seen by the LM).
OTHER_CARD = {**{k: v for k, v in CARD.items() if k != "_path"}, "name": "other_rvq", "num_codebooks": 4,
              "codebook_size": 64, "lm_codebooks": 2, "frame_rate": 12.5, "_path": "<test card>"}


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
    m = SoundStorm.load_anygpt_release(state, dtype=None, card=CARD)
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
    m = SoundStorm.load_anygpt_release(tmp_path / "speechtokenizer_soundstorm_mls.pt", heads=cfg.heads, card=CARD)
    assert m.config == cfg
    assert torch.equal(m.layers[1].conv.depthwise.weight, state["net.conformer.layers.1.conv.ds_conv.conv.weight"])
    assert torch.equal(m.layers[0].conv.chan_norm_gamma, state["net.conformer.layers.0.conv.net2.1.gamma"])
    assert torch.equal(m.head_bias, state["net.to_logits.2.bias"][0, 0])
    assert torch.equal(m.semantic_emb.weight, state["semantic_token_emb.weight"])
    out = m.generate(torch.arange(20) * 37 % C, seed=0)
    assert out.shape == (1, Q, 20)


def test_release_unused_keys_reported_missing_keys_named(caplog: pytest.LogCaptureFixture) -> None:
    cfg = SoundStormConfig.tiny()
    shapes = release_shapes(dim=cfg.dim, depth=cfg.depth, heads=cfg.heads, dim_head=cfg.dim_head,
                            ff_mult=cfg.ff_mult, conv_expansion=cfg.conv_expansion, kernel=cfg.conv_kernel_size)
    g = torch.Generator().manual_seed(1)
    state = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    # keys of modules the decoder does not build (another conformer's relative position bias, an extra head)
    extra = {"net.conformer.rel_pos_bias.relative_attention_bias.weight": torch.zeros(32, 2),
             "net.conformer.rel_pos_bias.extra": torch.zeros(3), "net.aux_head.weight": torch.zeros(4, 4)}
    with caplog.at_level(logging.WARNING, logger="anygpt.decoders.soundstorm"):
        m = SoundStorm.load_anygpt_release({**state, **extra}, heads=cfg.heads)
    reports = [r.getMessage() for r in caplog.records if "does not use" in r.getMessage()]
    assert len(reports) == 1  # once, grouped by prefix
    assert "3 keys" in reports[0] and "net.conformer.* 2" in reports[0] and "net.aux_head.* 1" in reports[0]
    assert torch.equal(m.semantic_emb.weight, state["semantic_token_emb.weight"])  # the used ones load

    del state["net.conformer.layers.1.conv.net2.2.bias"]
    state["net.conformer.layers.0.post_norm.weight"] = torch.zeros(cfg.dim + 1)
    with pytest.raises(SoundStormLoadError) as err:
        SoundStorm.load_anygpt_release({**state, **extra}, heads=cfg.heads)
    message = str(err.value)
    assert "\n" not in message
    assert "missing layers.1.conv.pointwise_out.bias" in message
    assert f"shape mismatch layers.0.post_norm.weight ({cfg.dim + 1},) != ({cfg.dim},)" in message
    assert "rel_pos_bias" not in message  # unused keys are not the problem
    with pytest.raises(SoundStormLoadError, match="not found"):
        SoundStorm.load_anygpt_release("/nonexistent/speechtokenizer_soundstorm_mls.pt")



# -- codec cards: every count comes from the card ------------------------------------------------------


def test_config_from_card_and_check_card(tmp_path: Path) -> None:
    cfg = SoundStormConfig.from_card(CARD, "tiny")
    assert (cfg.num_quantizers, cfg.codebook_size, cfg.semantic_vocab_size, cfg.semantic_codebooks) == (
        CARD["num_codebooks"], CARD["codebook_size"], CARD["codebook_size"], CARD["lm_codebooks"])
    assert cfg.frame_rate == CARD["frame_rate"] and cfg.codec == CARD["name"] and cfg.modality == SPEECH
    assert cfg == SoundStormConfig.tiny()
    cfg.check_card(CARD)
    other = SoundStormConfig.from_card(OTHER_CARD, "tiny")
    assert (other.num_quantizers, other.codebook_size, other.semantic_codebooks, other.num_acoustic) == (4, 64, 2, 2)

    SoundStorm(cfg).save_pretrained(tmp_path / "ss")
    assert SoundStorm.from_pretrained(tmp_path / "ss", card=CARD).config == cfg
    with pytest.raises(SoundStormLoadError) as err:
        SoundStorm.from_pretrained(tmp_path / "ss", card=OTHER_CARD)
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / "ss") in message and "other_rvq card" in message
    assert "num_quantizers=8 (card num_codebooks=4)" in message and "frame_rate=50.0 (card frame_rate=12.5)" in message
    with pytest.raises(ValueError, match="nothing to generate"):
        SoundStormConfig.from_card({**OTHER_CARD, "lm_codebooks": 4}, "tiny")


def test_other_rvq_codec_trains_and_decodes_with_voice_prompt() -> None:
    # Two conditioning codebooks, two generated ones, 64 codes each: nothing about SpeechTokenizer is assumed.
    torch.manual_seed(0)
    m = SoundStorm(SoundStormConfig.from_card(OTHER_CARD, "tiny"))
    g = torch.Generator().manual_seed(0)
    sem = torch.randint(0, 64, (4, 2, 30), generator=g)
    codes = torch.cat([sem, (sem[:, :1] * 5 + 3) % 64, (sem[:, 1:] * 7 + sem[:, :1]) % 64], dim=1)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss, stats = m.loss(codes, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(stats["loss"])
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5])
    with pytest.raises(ValueError, match=r"\[B, 4, T\]"):
        m.loss(codes[:, :3])
    m.eval()
    out = m.generate(sem[:2], seed=0)
    assert out.shape == (2, 4, 30) and torch.equal(out[:, :2], sem[:2]) and int(out.max()) < 64
    assert m.generate(sem[0], seed=0).shape == (1, 4, 30)  # [S, T]: one utterance
    prompt = codes[3, :, :10]
    full = m.generate(sem[:2], prompt=prompt, seed=0, include_prompt=True)
    assert full.shape == (2, 4, 40) and torch.equal(full[0, :, :10], prompt)
    assert not torch.equal(full[:, :, 10:], m.generate(sem[:2], prompt=codes[2, :, :10], seed=0))
    with pytest.raises(ValueError, match=r"prompt must be codes \[4, Tp\]"):
        m.generate(sem[:2], prompt=prompt[:2])


def test_from_pretrained_ignores_unused_keys_and_names_missing(model: SoundStorm, tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    model.save_pretrained(tmp_path / "ss")
    weights = tmp_path / "ss" / "model.safetensors"
    state = load_file(str(weights))
    save_file({**state, "ema.code_emb.weight": torch.zeros(2, 2), "ema.head_bias": torch.zeros(2),
               "discriminator.w": torch.zeros(1)}, str(weights))
    with caplog.at_level(logging.WARNING, logger="anygpt.decoders.soundstorm"):
        loaded = SoundStorm.from_pretrained(tmp_path / "ss")
    reports = [r.getMessage() for r in caplog.records if "does not use" in r.getMessage()]
    assert len(reports) == 1 and "3 keys" in reports[0] and "ema.code_emb.* 1" in reports[0]
    codes = structured_codes(1, 12)
    assert torch.equal(loaded.generate(codes[:, 0], seed=1), model.generate(codes[:, 0], seed=1))

    del state["head_norm.bias"]
    state["code_emb.weight"] = state["code_emb.weight"][:-1]
    save_file(state, str(weights))
    with pytest.raises(SoundStormLoadError) as err:
        SoundStorm.from_pretrained(tmp_path / "ss")
    message = str(err.value)
    assert "\n" not in message and "missing head_norm.bias" in message
    assert "shape mismatch code_emb.weight" in message


# -- trainer ------------------------------------------------------------------------------------------


def write_shards(root: Path, n_shards: int = 3, per_shard: int = 4) -> Path:
    """Shards as the pipeline writes them (ChunkWriter + encode_sample): speech pairs with all codebooks,
    a conversation with two speech turns, and rows the trainer must skip or ignore."""
    root.mkdir(parents=True, exist_ok=True)
    i = 0
    for s in range(n_shards):
        writer = ChunkWriter(root, "speech", s)
        for _ in range(per_shard):
            codes = structured_codes(1, 20 + 7 * (i % 5), seed=i)[0].numpy()
            key, files, _ = encode_sample(id=f"utt{i}", kind="pair", text=f"utterance {i}", source="test",
                                          media=[MediaItem(SPEECH, codes, C, 50.0, CARD["name"])])
            writer.add(key, files)
            i += 1
        if s == 0:
            turns = [MediaItem(SPEECH, structured_codes(1, 30, seed=90 + k)[0].numpy(), C, 50.0) for k in range(2)]
            key, files, _ = encode_sample(
                id="dialog", kind="conversation", source="test", media=turns,
                conversation=[{"role": "user", "content": [{"text": "hi"}, {"media": 0}]},
                              {"role": "assistant", "content": [{"media": 1}]}])
            writer.add(key, files)
            # layer-1-only speech (too few codebooks) and an image pair: skipped / ignored, never fatal
            key, files, _ = encode_sample(id="semonly", kind="pair", text="x", source="test",
                                          media=[MediaItem(SPEECH, np.zeros((1, 30), np.int64), C, 50.0)])
            writer.add(key, files)
            key, files, _ = encode_sample(id="img", kind="pair", text="a cat", source="test",
                                          media=[MediaItem("image", np.arange(32)[None], 8192)])
            writer.add(key, files)
        writer.close()
    return root


def tiny_run(tmp_path: Path, shards: Path, name: str, **more: object) -> list[str]:
    return [f"run.dir={tmp_path / name}", "model.size=tiny", "run.device=cpu", f"data.shards={shards}/*.tar",
            "run.tensorboard=false", "run.progress=false", *[f"{k}={v}" for k, v in more.items()]]


def losses_by_step(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def test_codes_of_sample_pairs_conversations_and_skips(tmp_path: Path) -> None:
    from anygpt.data.schema import SampleError
    from anygpt.data.shards import iter_shard_samples
    from anygpt.decoders.train_soundstorm import codes_of_sample

    write_shards(tmp_path, n_shards=1, per_shard=1)
    got: dict[str, object] = {}
    for raw in iter_shard_samples(str(tmp_path / "speech-000000.tar")):
        try:
            got[raw["__key__"]] = [c.shape for c in codes_of_sample(raw, SPEECH, Q, C)]
        except SampleError as e:
            got[raw["__key__"]] = e.reason
    assert got == {"utt0": [(Q, 20)], "dialog": [(Q, 30), (Q, 30)], "semonly": "too_few_codebooks", "img": []}


def test_trainer_writes_a_loadable_decoder_and_counts_damage(tmp_path: Path) -> None:
    from anygpt.decoders.train_soundstorm import train, load_soundstorm_config

    shards = write_shards(tmp_path / "shards")
    # cut the last shard in the middle: its header says 4 samples, fewer can be read
    damaged = shards / "speech-000002.tar"
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    cfg = load_soundstorm_config(REPO / "launch" / "configs" / "soundstorm.yaml",
                                 tiny_run(tmp_path, shards, "run", **{"run.max_steps": 8, "run.save_every": 4,
                                          "run.log_every": 2, "data.batch_size": 3, "data.max_frames": 32,
                                          "optim.lr": 1e-3, "optim.min_lr": 1e-4, "optim.warmup_steps": 2,
                                          "model.codecs": "null"}))
    summary = train(cfg)
    assert summary["steps"] == 8 and np.isfinite(summary["final_loss"])
    assert summary["damaged_shards"] == [str(damaged)] and summary["lost_samples"] >= 1
    assert set(summary["skipped_samples"]) == {"too_few_codebooks"}  # once per epoch that read it
    run = tmp_path / "run"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 4, 6, 8]
    assert all({"step", "loss", "acc", "lr"} <= set(r) for r in rows)
    assert rows[0]["lr"] == pytest.approx(5e-4) and rows[1]["lr"] == pytest.approx(1e-3)  # warmup, then cosine
    assert rows[-1]["lr"] == pytest.approx(1e-4)  # the cosine ends at min_lr on the last step
    # the final decoder is the run dir; each checkpoint is a decoder directory too; config.yaml re-runs
    loaded = SoundStorm.from_pretrained(run, card=CARD)
    assert loaded.config == SoundStormConfig.tiny()
    assert loaded.generate(torch.arange(10), seed=0).shape == (1, Q, 10)
    assert (run / "checkpoints" / "latest").read_text() == "step-00000008"
    SoundStorm.from_pretrained(run / "checkpoints" / "step-00000004")
    assert load_soundstorm_config(run / "config.yaml") == cfg
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        train(cfg)


def test_resume_repeats_the_uninterrupted_losses_exactly(tmp_path: Path) -> None:
    shards = write_shards(tmp_path / "shards")
    yaml_path = REPO / "launch" / "configs" / "soundstorm.yaml"
    more = {"run.max_steps": 7, "run.save_every": 2, "run.log_every": 1, "data.batch_size": 3,
            "data.max_frames": 24, "data.shuffle_block": 3, "optim.lr": 1e-3, "optim.warmup_steps": 2,
            "model.codecs": "null"}

    def launch(*args: str, faults: str | None = None) -> subprocess.CompletedProcess:
        # Every run in a fresh process through the launch script: a run inside the test process
        # differed from one in a subprocess by an ulp at step 2 on some machines (kernel choice), which
        # says nothing about resuming.
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        if faults:
            env["ANYGPT_TRAIN_FAULTS"] = faults
        return subprocess.run([sys.executable, str(REPO / "launch" / "train_soundstorm.py"), *args], env=env,
                              capture_output=True, text=True, timeout=300)

    proc = launch("--config", str(yaml_path), *tiny_run(tmp_path, shards, "full", **more))
    assert proc.returncode == 0, proc.stderr[-2000:]
    full = losses_by_step(tmp_path / "full")
    assert sorted(full) == list(range(1, 8))

    # the same run killed (SIGKILL) right after step 5: its newest checkpoint is step 4
    proc = launch("--config", str(yaml_path), *tiny_run(tmp_path, shards, "cut", **more), faults="kill_after_step@5")
    assert proc.returncode == -9, proc.stderr[-2000:]
    cut = tmp_path / "cut"
    assert (cut / "checkpoints" / "latest").read_text() == "step-00000004"
    assert sorted(losses_by_step(cut)) == [1, 2, 3, 4, 5]
    proc = launch("--config", str(cut / "config.yaml"), "--resume", "auto")
    assert proc.returncode == 0, proc.stderr[-2000:]
    resumed = losses_by_step(cut)
    assert resumed == full  # bit-identical per-step losses (JSON floats round-trip exactly)


def test_config_errors_name_the_key_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from anygpt.decoders.train_soundstorm import load_soundstorm_config, preflight

    yaml_path = REPO / "launch" / "configs" / "soundstorm.yaml"
    shards = write_shards(tmp_path / "shards", n_shards=1, per_shard=1)
    base = tiny_run(tmp_path, shards, "run", **{"model.codecs": "null"})
    for overrides, message in [
        (["run.devcie=cpu"], r"run\.devcie: unknown key"),
        (["run.device=gpu"], r"run\.device: 'gpu' is not auto, cpu, cuda or cuda:N"),
        (["model.size=huge"], r"model\.size: 'huge' is not one of"),
        (["data.shards="], r"data\.shards: required"),
        (["optim.warmup_steps=10", "run.max_steps=5"], r"optim\.warmup_steps: must be within"),
        (["data.batch_size=0"], r"data\.batch_size: must be > 0"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_soundstorm_config(yaml_path, base + overrides)
    for overrides, message in [
        ([f"data.shards={tmp_path}/none-*.tar"], r"data\.shards: .*glob matches no shard"),
        ([f"model.codecs={tmp_path}/nocodecs"], r"model\.codecs: .*no such directory"),
        (["model.codec=no_such_codec"], r"model\.codec: no card for codec 'no_such_codec'"),
        (["model.modality=image"], r"model\.modality: modality 'image' has no acoustic decoder"),
    ]:
        with pytest.raises(ConfigError, match=message):
            preflight(load_soundstorm_config(yaml_path, base + overrides))
    assert not (tmp_path / "run").exists()
    # the codecs directory's card decides: a card with every codebook seen by the LM has nothing to learn
    import yaml

    (tmp_path / "codecs" / SPEECH).mkdir(parents=True)
    card = {k: v for k, v in OTHER_CARD.items() if not k.startswith("_")}
    (tmp_path / "codecs" / SPEECH / "card.yaml").write_text(yaml.safe_dump({**card, "lm_codebooks": 4}))
    with pytest.raises(ConfigError, match=r"model\.codecs: the other_rvq codec has 4 codebook\(s\), all seen"):
        preflight(load_soundstorm_config(yaml_path, base + [f"model.codecs={tmp_path / 'codecs'}"]))
    # the launch script prints one line and exits 1
    spec = importlib.util.spec_from_file_location("launch_train_soundstorm", REPO / "launch" / "train_soundstorm.py")
    assert spec and spec.loader
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.soundstorm_main(["--config", str(yaml_path), *base, "run.device=gpu"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: run.device:") and "\n" not in err


def test_trainer_takes_the_codec_facts_from_the_codecs_directory(tmp_path: Path) -> None:
    import yaml

    from anygpt.decoders.train_soundstorm import load_soundstorm_config, train

    (tmp_path / "codecs" / SPEECH).mkdir(parents=True)
    card = {k: v for k, v in OTHER_CARD.items() if not k.startswith("_")}
    (tmp_path / "codecs" / SPEECH / "card.yaml").write_text(yaml.safe_dump(card))
    shards = tmp_path / "shards"
    shards.mkdir()
    writer = ChunkWriter(shards, "speech", 0)
    g = np.random.default_rng(0)
    for i in range(5):
        codes = g.integers(0, 64, (4, 16 + i))
        key, files, _ = encode_sample(id=f"u{i}", kind="pair", text="t", source="test",
                                      media=[MediaItem(SPEECH, codes, 64, 12.5, "other_rvq")])
        writer.add(key, files)
    writer.close()
    cfg = load_soundstorm_config(REPO / "launch" / "configs" / "soundstorm.yaml", tiny_run(
        tmp_path, shards, "run", **{"model.codecs": tmp_path / "codecs", "run.max_steps": 2, "data.batch_size": 2,
                                    "optim.warmup_steps": 1}))
    train(cfg)
    loaded = SoundStorm.from_pretrained(tmp_path / "run", card=OTHER_CARD)
    assert (loaded.config.num_quantizers, loaded.config.codebook_size, loaded.config.semantic_codebooks,
            loaded.config.frame_rate, loaded.config.codec) == (4, 64, 2, 12.5, "other_rvq")
    with pytest.raises(SoundStormLoadError, match="speechtokenizer card"):
        SoundStorm.from_pretrained(tmp_path / "run", card=CARD)


def test_shipped_yaml_validates_and_the_wrapper_keeps_working(tmp_path: Path) -> None:
    from anygpt.decoders.train_soundstorm import load_soundstorm_config, train_soundstorm

    path = REPO / "launch" / "configs" / "soundstorm.yaml"
    first = path.read_text().splitlines()[0]
    assert first == "# python launch/train_soundstorm.py --config launch/configs/soundstorm.yaml"
    assert (REPO / "launch" / "train_soundstorm.py").read_text().splitlines()[0] == first
    cfg = load_soundstorm_config("soundstorm")  # a shipped config by name, as an installed package finds it
    assert cfg == load_soundstorm_config(path) and cfg.model.size == "release" and cfg.run.device == "auto"

    shards = write_shards(tmp_path / "shards", n_shards=1, per_shard=3)
    summary = train_soundstorm([str(shards / "speech-000000.tar")], tmp_path / "w", steps=3, batch_size=2,
                               lr=1e-3, max_frames=16, seed=0, device="cpu", config=SoundStormConfig.tiny(),
                               progress=False)
    assert summary["steps"] == 3 and (tmp_path / "w" / "model.safetensors").is_file()
    assert SoundStorm.from_pretrained(tmp_path / "w").config == SoundStormConfig.tiny()
