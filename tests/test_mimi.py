"""The Mimi speech codec (anygpt/modalities/mimi.py + tokenizers/mimi.yaml): frame rule, decode lengths,
batching, fitting of the split quantiser, checkpoint directories (ours, ``MimiModel.save_pretrained``,
raw downloads inside a codecs directory), strict loading, CLI, layout and bench rows.

Everything runs on the tiny random Mimi (0.6 M parameters, same MimiConfig code path, real 24 kHz /
12.5 Hz / 2048-entry layout).
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml

from anygpt import modalities as registry
from anygpt.layout import LayoutError, VocabLayout
from anygpt.modalities import CodecError, build_codec, load_codecs
from anygpt.modalities.fit import fit_codebooks
from anygpt.modalities.mimi import TINY_CONFIG, MimiCodec


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Small convolutions on a shared 2-core runner: one intra-op thread is faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tone(sr: int, seconds: float, kind: int) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    if kind == 0:
        x = np.sin(2 * np.pi * 220 * t)
    elif kind == 1:
        x = np.sin(2 * np.pi * (300 + 2000 * t) * t)
    elif kind == 2:
        x = np.sign(np.sin(2 * np.pi * 3 * t)) * np.sin(2 * np.pi * 1500 * t)
    else:
        x = np.random.default_rng(kind).standard_normal(len(t)) * 0.5
    return (0.4 * x).astype(np.float32)


def clips() -> list[np.ndarray]:
    return [tone(24000, 1.0, k) for k in range(4)] + [tone(24000, 0.6, 1), tone(24000, 1.3, 3)]


@pytest.fixture(scope="module")
def fitted() -> MimiCodec:
    codec = build_codec("speech", "tiny", codec="mimi")
    codec.encode(clips()[:1])  # computes (and caches) every codebook's embed before fitting: the trap
    fit_codebooks(codec, clips(), iters=5)
    return codec


# ------------------------------------------------------------------------------ card, shapes ---


def test_card_and_tiny_codec_agree():
    card = registry.codec_card("speech", "mimi")
    assert registry.codec_names("speech") == ["speechtokenizer", "mimi"]  # default first: nothing changes
    assert (card["sample_rate"], card["frame_rate"], card["num_codebooks"], card["codebook_size"],
            card["lm_codebooks"]) == (24000, 12.5, 8, 2048, 1)
    assert card["files"] == {"config": ["config.json"], "weights": ["model.safetensors"]}
    assert "kyutai/mimi" in card["checkpoints"][0]["get"] and "CC-BY-4.0" in card["license"]
    codec = build_codec("speech", "tiny", codec="mimi")
    assert isinstance(codec, MimiCodec) and codec.card["tiny"] is True and codec.lm_codebooks == 1
    assert (codec.sample_rate, codec.frame_rate, codec.num_codebooks, codec.codebook_size) == (24000, 12.5, 8, 2048)
    assert codec.model.config.num_quantizers == TINY_CONFIG["num_quantizers"] == 8


def test_frame_rule_decode_lengths_and_bad_codes():
    codec = build_codec("speech", "tiny", codec="mimi")
    lengths = [24000, 24001, 23999, 12000, 1920, 1921, 1, 72000]
    codes = codec.encode([tone(24000, n / 24000, 3)[:n] if n > 1 else np.ones(1, np.float32) for n in lengths])
    # every causal conv pads its last window full: ceil(L / 960) SEANet frames, then ceil(/2) -> ceil(L / 1920)
    assert [c.shape for c in codes] == [(8, math.ceil(n / 1920)) for n in lengths]
    assert [c.shape[1] for c in codes[:4]] == [13, 13, 13, 7]  # 1 s -> 13 frames (12.5 rounded up)
    assert all(c.dtype == np.int64 for c in codes)
    assert all((c == 0).all() for c in codes)  # all-zero random codebooks, as released models start
    for k in (1, 3, 8):  # any number of leading codebooks renders T * 1920 samples
        wav = codec.decode([codes[0][:k]])[0]
        assert wav.shape == (13 * 1920,) and wav.dtype == np.float32 and np.isfinite(wav).all()
    assert codec.decode([codes[0][0]])[0].shape == (13 * 1920,)  # a 1-D semantic row
    with pytest.raises(CodecError, match=r"expected \[K<=8, T\]"):
        codec.decode([np.zeros((9, 4), np.int64)])
    with pytest.raises(CodecError, match=r"must lie in \[0, 2048\)"):
        codec.decode([np.full((1, 4), 2048)])


def test_batch_gives_each_item_its_own_codes(fitted):
    items = clips()
    alone = [fitted.encode([w])[0] for w in items]
    together = fitted.encode(items)
    assert all(np.array_equal(a, b) for a, b in zip(alone, together))
    assert len({c.tobytes() for c in alone}) == len(items)  # fitted: the test can tell items apart
    # decoding keeps equal shapes in one pass: fp32 noise only (the random decoder's output reaches ~50)
    for w, c in zip(fitted.decode(together), together):
        single = fitted.decode([c])[0]
        assert w.shape == single.shape and np.abs(w - single).max() <= 1e-5 * np.abs(single).max()


# ---------------------------------------------------------------------------------------- fit ---


def test_fit_moves_every_codebook_and_makes_codes_differ(fitted):
    fresh = build_codec("speech", "tiny", codec="mimi")
    before = fresh.encode(clips())
    after = fitted.encode(clips())
    assert all((c == 0).all() for c in before)
    assert not np.array_equal(after[0], after[1]) and not np.array_equal(after[1], after[2])
    for k in range(8):  # semantic row and every acoustic row carry content
        assert len(np.unique(np.concatenate([c[k] for c in after]))) > 3, k
    # the split quantiser: the semantic chain and the acoustic chain read different projections of the
    # same latent, and the acoustic codebook 1 was fitted on the acoustic projection, not on the
    # semantic residual
    (sem_x, sem_books), (ac_x, ac_books) = fitted.fit_chains(clips())
    assert len(sem_books) == 1 and len(ac_books) == 7 and sem_x.shape == ac_x.shape
    assert not torch.allclose(sem_x, ac_x)
    first = ac_books[0].embed
    err_ac = (ac_x[:, None] - first[None]).pow(2).sum(-1).min(1).values.mean()
    err_sem = (sem_x[:, None] - first[None]).pow(2).sum(-1).min(1).values.mean()
    assert err_ac < err_sem
    cb = fitted.model.quantizer.semantic_residual_vector_quantizer.layers[0].codebook
    assert torch.allclose(cb.embed_sum / cb.cluster_usage[:, None], cb.embed)  # the stored statistics


# ---------------------------------------------------------------------------- directories ---


def test_save_round_trip_and_codecs_dir(fitted, tmp_path):
    fitted.save(tmp_path / "speech")
    assert sorted(p.name for p in (tmp_path / "speech").iterdir()) == ["card.yaml", "config.json", "model.safetensors"]
    assert yaml.safe_load((tmp_path / "speech" / "card.yaml").read_text())["name"] == "mimi"
    again = load_codecs(tmp_path)["speech"]
    assert isinstance(again, MimiCodec)
    assert all(np.array_equal(a, b) for a, b in zip(again.encode(clips()), fitted.encode(clips())))
    with pytest.raises(CodecError, match="holds codec 'mimi', not 'speechtokenizer'"):
        build_codec("speech", tmp_path / "speech", codec="speechtokenizer")


def test_save_pretrained_directory_loads_with_and_without_a_card(fitted, tmp_path):
    """A raw ``MimiModel.save_pretrained`` directory (the kyutai/mimi download layout, no card.yaml)."""
    raw = tmp_path / "codecs" / "speech"
    fitted.model.save_pretrained(str(raw))
    assert not (raw / "card.yaml").exists() and json.loads((raw / "config.json").read_text())["model_type"] == "mimi"
    want = fitted.encode(clips())
    for codec in (build_codec("speech", raw, codec="mimi"), build_codec("speech", raw),
                  load_codecs(tmp_path / "codecs")["speech"]):
        assert isinstance(codec, MimiCodec) and codec.card["name"] == "mimi"
        assert all(np.array_equal(a, b) for a, b in zip(codec.encode(clips()), want))
    assert registry.directory_cards(tmp_path / "codecs")["speech"]["name"] == "mimi"  # layout checks see Mimi
    assert registry.codec_dir(raw, "speech") == raw  # the download itself passed as --codecs
    with pytest.raises(CodecError, match="holds codec 'mimi' .*detect rule.*not 'speechtokenizer'"):
        build_codec("speech", raw, codec="speechtokenizer")


def test_detect_rule_is_checked_and_other_raw_downloads_keep_the_default(tmp_path):
    from anygpt.modalities.cards import validate_card

    card = dict(registry.codec_card("speech", "mimi"))
    with pytest.raises(CodecError, match="'detect' must map a JSON file name"):
        validate_card({**card, "detect": {"config.json": "mimi"}})
    # a SpeechTokenizer download (config.json without model_type, no card.yaml) is still SpeechTokenizer
    build_codec("speech", "tiny").save(tmp_path / "st")
    (tmp_path / "st" / "card.yaml").unlink()
    assert registry.directory_card(tmp_path / "st", "speech")["name"] == "speechtokenizer"
    assert build_codec("speech", tmp_path / "st").card["name"] == "speechtokenizer"


def test_missing_files_and_keys_are_errors_unused_keys_reported(fitted, tmp_path, caplog):
    from safetensors.torch import load_file, save_file

    (tmp_path / "empty").mkdir()
    with pytest.raises(CodecError) as err:
        build_codec("speech", tmp_path / "empty", codec="mimi")
    msg = str(err.value)
    assert "mimi card" in msg and "model.safetensors" in msg and "config.json" in msg
    assert "huggingface.co/kyutai/mimi" in msg and "\n" not in msg

    fitted.model.save_pretrained(str(tmp_path / "ok"))
    sd = load_file(str(tmp_path / "ok" / "model.safetensors"))

    def variant(name: str, state: dict) -> Path:
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text((tmp_path / "ok" / "config.json").read_text())
        save_file(state, str(d / "model.safetensors"))
        return d

    missing = dict(sd)
    del missing["encoder.layers.0.conv.weight"], missing["quantizer.semantic_residual_vector_quantizer.layers.0.codebook.embed_sum"]
    with pytest.raises(CodecError, match="mimi card.*2 missing keys"):
        build_codec("speech", variant("missing", missing))
    shaped = {**sd, "decoder.layers.0.conv.weight": torch.zeros(3, 3, 3)}
    with pytest.raises(CodecError, match=r"mimi card.*1 shape mismatches.*\(3, 3, 3\)"):
        build_codec("speech", variant("shaped", shaped))
    # extra keys, including ones under prefixes MimiModel's own loader would silently drop
    extra = {**sd, "extra.head.weight": torch.zeros(2), "encoder.bogus.weight": torch.zeros(2),
             "quantizer.acoustic_residual_vector_quantizer.layers.30.codebook.embed_sum": torch.zeros(4, 32)}
    with caplog.at_level(logging.WARNING, logger="anygpt.modalities.cards"):
        codec = build_codec("speech", variant("extra", extra))
    assert "holds 3 keys this codec does not use" in caplog.text
    assert all(np.array_equal(a, b) for a, b in zip(codec.encode(clips()[:2]), fitted.encode(clips()[:2])))


# -------------------------------------------------------------------------- CLI, layout, bench ---


def test_cli_tiny_mimi_encode_decode_fit(tmp_path, capsys):
    from anygpt.modalities.cli import main

    wavs = []
    for k in range(3):
        wavs.append(tmp_path / f"s{k}.wav")
        sf.write(wavs[-1], tone(22050, 1.0, k), 22050)  # resampled to 24 kHz on read
    assert main(["codec", "encode", "--modality", "speech", "--input", str(wavs[0]), "--tiny", "--codec", "mimi",
                 "--out", str(tmp_path / "c.npy")]) == 0
    assert np.load(tmp_path / "c.npy").shape == (8, 13)
    assert main(["codec", "decode", "--modality", "speech", "--input", str(tmp_path / "c.npy"), "--tiny",
                 "--codec", "mimi", "--out", str(tmp_path / "c.wav")]) == 0
    info = sf.info(str(tmp_path / "c.wav"))
    assert (info.samplerate, info.frames, info.channels) == (24000, 13 * 1920, 1)
    assert main(["codec", "fit", "--modality", "speech", "--inputs", *map(str, wavs), "--tiny", "--codec", "mimi",
                 "--out", str(tmp_path / "codecs"), "--iters", "5"]) == 0
    card = yaml.safe_load((tmp_path / "codecs" / "speech" / "card.yaml").read_text())
    assert card["name"] == "mimi" and len(card["fitted"]["codebooks"]) == 8
    assert all(cb["used"] > 1 for cb in card["fitted"]["codebooks"]), card["fitted"]
    codes = []
    for k, w in enumerate(wavs):
        assert main(["codec", "encode", "--modality", "speech", "--input", str(w), "--codecs",
                     str(tmp_path / "codecs"), "--out", str(tmp_path / f"f{k}.npy")]) == 0
        codes.append(np.load(tmp_path / f"f{k}.npy"))
    assert not np.array_equal(codes[0], codes[1]) and not np.array_equal(codes[1], codes[2])
    out = capsys.readouterr().out
    assert "codec speech mimi (tiny)" in out and "codes [8, 13]" in out


def test_layout_from_the_mimi_card():
    mimi = registry.codec_card("speech", "mimi")
    layout = VocabLayout.default(32000, cards={"speech": mimi})
    spec = layout.modalities["speech"]
    assert (spec.size, spec.num_codebooks, spec.codebook_size, spec.codec) == (2048, 1, 2048, "mimi")
    layout.validate()
    default = VocabLayout.default(32000)
    assert default.modalities["speech"].size == 1024 and default.modalities["speech"].codec == "speechtokenizer"
    with pytest.raises(LayoutError, match="trained with codec speechtokenizer.*codecs hold mimi"):
        default.check_cards({"speech": mimi})


def test_bench_rows_report_lm_positions_per_second():
    from anygpt.modalities.bench import _audio_rows

    rows = {}
    for name in ("speechtokenizer", "mimi"):
        codec = build_codec("speech", "tiny", codec=name)
        rows[name] = _audio_rows(codec, "tiny", 0.5, (1,), 1)[0]
    assert rows["mimi"]["lm_positions_per_s"] == 12.5 and rows["speechtokenizer"]["lm_positions_per_s"] == 50
    assert rows["mimi"]["codes"] == [8, 7] and rows["speechtokenizer"]["codes"] == [8, 25]
