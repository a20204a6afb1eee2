"""Modality codecs: SpeechTokenizer, Encodec 32 kHz, SEED — shapes, rates, checkpoint loading, fit, CLI.

Fixtures are generated on the fly (no binary files in the repo).  Real-size codecs are the released
architectures with random weights: enough to check shapes, frame rates and checkpoint layouts.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml
from PIL import Image

from anygpt import modalities as registry
from anygpt.modalities import CodecError, build_codec, load_codecs
from anygpt.modalities.cards import dir_card
from anygpt.resources import shipped_dir

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Small convolutions are dominated by thread synchronisation on a shared 2-core runner:
    one intra-op thread is several times faster there (and no slower on a quiet machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------ fixtures ---


def tone(sr: int, seconds: float, kind: int) -> np.ndarray:
    """Clearly different signals: tones, a chirp, a pulse train, noise."""
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


def picture(kind: int, size: tuple[int, int] = (96, 80)) -> Image.Image:
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.zeros((h, w, 3), np.uint8)
    if kind == 0:
        arr[..., 0] = 255 * (xx < w // 2)
    elif kind == 1:
        arr[..., 2] = (255 * yy / h).astype(np.uint8)
        arr[..., 1] = 255 * ((xx // 8 + yy // 8) % 2)
    else:
        arr[...] = 255 * ((xx - w / 2) ** 2 + (yy - h / 2) ** 2 < (h / 3) ** 2)[..., None]
    return Image.fromarray(arr)


@pytest.fixture(scope="module")
def media_files(tmp_path_factory) -> dict[str, list[Path]]:
    d = tmp_path_factory.mktemp("media")
    out: dict[str, list[Path]] = {"speech": [], "music": [], "image": []}
    for k in range(3):
        p = d / f"speech{k}.wav"
        sf.write(p, tone(22050, 1.0, k), 22050)  # resampled to 16 kHz on load
        out["speech"].append(p)
        p = d / f"music{k}.flac"
        sf.write(p, np.stack([tone(44100, 1.0, k), tone(44100, 1.0, k + 1)], 1), 44100)  # stereo 44.1k
        out["music"].append(p)
        p = d / f"image{k}.png"
        picture(k).save(p)
        out["image"].append(p)
    return out


@pytest.fixture(scope="module")
def fitted_dir(tmp_path_factory, media_files) -> Path:
    """A codecs directory with all three tiny codecs fitted by ``anygpt codec fit``."""
    from anygpt.modalities.cli import main

    out = tmp_path_factory.mktemp("codecs")
    # SEED's one codebook serves all 32 query slots, whose vectors differ mostly by slot: k-means needs a
    # few clusters per slot to see content (3 pictures give 24 clusters for 32 slots, so every picture
    # got the same codes).  The image fit also sees the pictures flipped and turned: 12 inputs, 96 codes.
    extra = tmp_path_factory.mktemp("flipped")
    flips = (Image.FLIP_LEFT_RIGHT, Image.FLIP_TOP_BOTTOM, Image.ROTATE_180)
    images = list(media_files["image"])
    for k, path in enumerate(media_files["image"]):
        for j, how in enumerate(flips):
            images.append(extra / f"image{k}-{j}.png")
            Image.open(path).transpose(how).save(images[-1])
    for m, inputs in (("speech", media_files["speech"]), ("music", media_files["music"]), ("image", images)):
        rc = main(["codec", "fit", "--modality", m, "--inputs", *map(str, inputs), "--out", str(out),
                   "--iters", "10"])
        assert rc == 0
    return out


# --------------------------------------------------------------------------- import hygiene ---


def test_no_torchaudio_anywhere():
    """Importing and running every codec module must not import torchaudio (or speechtokenizer)."""
    code = (
        "import sys, numpy as np\n"
        "import anygpt.modalities.speechtokenizer, anygpt.modalities.encodec, anygpt.modalities.seed\n"
        "import anygpt.modalities.fit, anygpt.modalities.cli, anygpt.modalities.bench\n"
        "from anygpt.modalities import build_codec\n"
        "c = build_codec('speech', 'tiny'); c.decode(c.encode([np.zeros(3200, np.float32)]))\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torchaudio', 'speechtokenizer', 'torchvision', 'encodec')]\n"
        "print('BAD', bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120, env=env)
    assert r.returncode == 0, r.stdout + r.stderr


def test_shipped_cards_are_the_repository_tokenizers_dir_and_data_only():
    assert shipped_dir("cards").resolve() == (REPO / "tokenizers").resolve()
    assert not list((REPO / "tokenizers").glob("*.py"))


# ------------------------------------------------------------------------------------- cards ---


@pytest.mark.parametrize("modality", registry.names())
def test_default_card_of_every_modality_agrees_with_its_codec(modality):
    card = registry.codec_card(modality)
    assert card["name"] == registry.get(modality).default_codec
    assert yaml.safe_load((REPO / "tokenizers" / f"{card['name']}.yaml").read_text())["modality"] == modality
    assert card["checkpoints"] and card["license"]
    codec = build_codec(modality, "tiny")
    assert codec.card["name"] == card["name"] and codec.modality == modality
    assert codec.num_codebooks == card["num_codebooks"] and codec.codebook_size == card["codebook_size"]
    assert codec.sample_rate == card["sample_rate"]
    assert (codec.frame_rate is None) == (card["frame_rate"] is None)
    if card["frame_rate"] is not None:
        assert codec.frame_rate == card["frame_rate"]


def test_missing_checkpoint_names_card_and_expected_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CodecError) as err:
        build_codec("speech", tmp_path)
    msg = str(err.value)
    assert "speechtokenizer card" in msg and "SpeechTokenizer.pt" in msg and "config.json" in msg
    assert "huggingface.co/fnlp/SpeechTokenizer" in msg and "\n" not in msg
    with pytest.raises(CodecError, match="encodec_32khz card.*model.safetensors"):
        build_codec("music", tmp_path / "nowhere")
    with pytest.raises(CodecError, match="seed_tokenizer_2 card.*seed_quantizer.pt"):
        build_codec("image", tmp_path)


# ------------------------------------------------------------------------------------ speech ---


def test_tiny_builds_on_threads_equal_sequential_ones_and_leave_the_callers_rng_alone():
    """The demo fits its codecs on two threads; a tiny build seeds torch's global generator, so builds
    take a lock (anygpt.modalities.base): weights built concurrently must equal those built one by one."""
    from concurrent.futures import ThreadPoolExecutor

    names = list(registry.names())

    def weights(m):
        return {k: v.clone() for k, v in build_codec(m, "tiny").state_dict().items()}

    alone = {m: weights(m) for m in names}
    torch.manual_seed(1234)
    expected_next = torch.rand(3)
    torch.manual_seed(1234)
    with ThreadPoolExecutor(max_workers=len(names) * 2) as pool:
        together = list(pool.map(weights, names * 2))
    assert torch.equal(torch.rand(3), expected_next)  # the builds forked the generator, never advanced it
    for m, w in zip(names * 2, together):
        assert w.keys() == alone[m].keys(), m
        assert all(torch.equal(w[k], alone[m][k]) for k in w), m


def test_speech_tiny_shapes_and_rates():
    codec = build_codec("speech", "tiny")
    assert (codec.sample_rate, codec.frame_rate, codec.num_codebooks, codec.codebook_size) == (16000, 50, 8, 1024)
    wavs = [tone(16000, 1.0, 0), tone(16000, 0.5, 1), tone(16000, 1.0, 2), tone(16000, 0.3071, 3)]
    codes = codec.encode(wavs)
    assert [c.shape for c in codes] == [(8, 50), (8, 25), (8, 50), (8, math.ceil(0.3071 * 16000 / 320))]
    assert all(c.dtype == np.int64 for c in codes)
    # Random codebooks start at zero like the official kmeans_init model: constant codes.
    assert all((c == 0).all() for c in codes)
    back = codec.decode(codes)
    assert [len(w) for w in back] == [c.shape[1] * 320 for c in codes]
    assert all(np.isfinite(w).all() and w.dtype == np.float32 for w in back)
    # fewer layers (e.g. layer 1 only) still decode to the same length
    assert len(codec.decode([codes[0][:1]])[0]) == 16000


def test_speech_encode_accepts_paths_and_rejects_bad_arrays(tmp_path):
    from anygpt.modalities.media import MediaError

    codec = build_codec("speech", "tiny")
    sf.write(tmp_path / "x.wav", tone(8000, 0.5, 1), 8000)  # resampled to 16 kHz on read
    assert codec.encode([tmp_path / "x.wav"])[0].shape == (8, 25)
    with pytest.raises(MediaError, match="speech item 1: zero-length"):
        codec.encode([tone(16000, 0.1, 0), np.zeros(0, np.float32)])


def test_speech_decode_layers_matches_full_decode():
    codec = build_codec("speech", "tiny")
    rng = np.random.default_rng(0)
    codes = torch.from_numpy(rng.integers(0, 1024, (8, 2, 20)))
    full = codec.decode_tensor(codes)
    split = codec.decode_layers(codes[0], codes[1:])
    assert tuple(full.shape) == (2, 1, 20 * 320)
    torch.testing.assert_close(full, split)
    assert tuple(codec.decode_layers(codes[0]).shape) == (2, 1, 6400)
    with pytest.raises(CodecError, match="must lie in"):
        codec.decode([np.full((8, 5), 1024)])


OFFICIAL_SPEECH_KEYS = [
    "encoder.model.0.conv.conv.weight_g", "encoder.model.0.conv.conv.weight_v", "encoder.model.0.conv.conv.bias",
    "encoder.model.1.block.1.conv.conv.weight_v", "encoder.model.1.block.3.conv.conv.weight_g",
    "encoder.model.1.shortcut.conv.conv.weight_g", "encoder.model.3.conv.conv.weight_v",
    "encoder.model.13.lstm.weight_ih_l0", "encoder.model.13.lstm.weight_hh_l1_reverse",
    "encoder.model.15.conv.conv.bias", "transform.weight", "transform.bias",
    "quantizer.vq.layers.0._codebook.inited", "quantizer.vq.layers.0._codebook.cluster_size",
    "quantizer.vq.layers.7._codebook.embed", "quantizer.vq.layers.7._codebook.embed_avg",
    "decoder.model.0.conv.conv.weight_g", "decoder.model.1.lstm.weight_ih_l1",
    "decoder.model.3.convtr.convtr.weight_g", "decoder.model.4.block.1.conv.conv.weight_v",
    "decoder.model.15.conv.conv.weight_v",
]


@pytest.mark.slow
def test_speech_real_size_shapes_and_strict_official_checkpoint(tmp_path):
    from anygpt.modalities.speechtokenizer import OFFICIAL_CONFIG, SpeechTokenizerCodec

    codec = SpeechTokenizerCodec.official()
    n_params = sum(p.numel() for p in codec.parameters())
    assert abs(n_params / 1e6 - 103.7) < 0.1  # the released model's size
    sd = codec.state_dict()
    assert set(OFFICIAL_SPEECH_KEYS) <= set(sd) and len(sd) == 166
    assert tuple(sd["encoder.model.0.conv.conv.weight_g"].shape) == (64, 1, 1)
    assert tuple(sd["decoder.model.3.convtr.convtr.weight_g"].shape) == (1024, 1, 1)  # dim 0 = in_channels
    assert tuple(sd["quantizer.vq.layers.0._codebook.embed"].shape) == (1024, 1024)
    assert tuple(sd["transform.weight"].shape) == (768, 1024)

    wav = tone(16000, 3.0, 1)
    (codes,) = codec.encode([wav])
    assert codes.shape == (8, 150)  # 3 s at 50 Hz
    assert len(codec.decode([codes])[0]) == 48000

    # Official directory layout: the training config.json (extra keys) + SpeechTokenizer.pt.
    ckpt = tmp_path / "speechtokenizer_hubert_avg"
    ckpt.mkdir()
    cfg = {**OFFICIAL_CONFIG, "num_mels": 80, "sample_rate": 16000, "semantic_model_layer": "avg"}
    (ckpt / "config.json").write_text(json.dumps(cfg))
    for layer in codec.quantizer.vq.layers:  # non-trivial codebooks, so equality below means something
        layer._codebook.embed.normal_()
    torch.save(codec.state_dict(), ckpt / "SpeechTokenizer.pt")
    loaded = build_codec("speech", ckpt)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_speech_loading_errors_and_unused_keys(tmp_path, caplog):
    """Missing keys and a config that contradicts the card are one-line CodecErrors; keys the codec
    does not use are reported once, grouped by prefix, and the codec loads with the same codes."""
    codec = build_codec("speech", "tiny")
    codec.save(tmp_path)
    wav = [tone(16000, 0.5, 1)]
    want = codec.encode(wav)[0]
    sd = torch.load(tmp_path / "SpeechTokenizer.pt", weights_only=True)
    sd["quantizer.vq.layers.8._codebook.embed"] = torch.zeros(1024, 64)
    sd["discriminator.head.weight"] = torch.zeros(3)
    torch.save(sd, tmp_path / "SpeechTokenizer.pt")
    with caplog.at_level("WARNING"):
        loaded = build_codec("speech", tmp_path)
    assert np.array_equal(loaded.encode(wav)[0], want)
    warned = [r.getMessage() for r in caplog.records if "does not use" in r.getMessage()]
    assert len(warned) == 1 and "2 keys" in warned[0] and "discriminator.head.* 1" in warned[0]
    sd.pop("transform.bias")
    torch.save(sd, tmp_path / "SpeechTokenizer.pt")
    with pytest.raises(CodecError) as err:
        build_codec("speech", tmp_path)
    msg = str(err.value)
    assert "speechtokenizer card" in msg and "SpeechTokenizer.pt" in msg and "\n" not in msg
    assert "1 missing keys" in msg and "transform.bias" in msg
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "n_q": 4}))
    with pytest.raises(CodecError, match="does not match the card.*num_codebooks=4"):
        build_codec("speech", tmp_path)


def test_speech_snake_variant_keys():
    from anygpt.modalities.speechtokenizer import TINY_CONFIG, SpeechTokenizerCodec

    codec = SpeechTokenizerCodec({**TINY_CONFIG, "activation": "Snake"})
    sd = codec.state_dict()
    assert "encoder.model.1.block.0.alpha" in sd and "decoder.model.14.alpha" in sd
    assert codec.encode([tone(16000, 0.2, 0)])[0].shape == (8, 10)


# ------------------------------------------------------------------------------------- music ---


def test_music_tiny_shapes_rates_and_chunking():
    from anygpt.modalities.encodec import EncodecMusicCodec

    codec = build_codec("music", "tiny")
    assert (codec.sample_rate, codec.frame_rate, codec.num_codebooks, codec.codebook_size) == (32000, 50, 4, 2048)
    wavs = [tone(32000, 1.0, 1), tone(32000, 0.51, 2)]
    codes = codec.encode(wavs)
    assert [c.shape for c in codes] == [(4, 50), (4, math.ceil(0.51 * 32000 / 640))]
    assert all((c == 0).all() for c in codes)  # zero codebooks until fitted
    back = codec.decode(codes)
    assert [len(w) for w in back] == [32000, codes[1].shape[1] * 640]

    # A long input in hop-aligned chunks: frame counts add up exactly.
    chunked = EncodecMusicCodec(codec.model, chunk_seconds=0.3)
    assert chunked.chunk_samples == 15 * 640
    long = tone(32000, 2.03, 3)
    (c,) = chunked.encode([long])
    assert c.shape == (4, math.ceil(len(long) / 640))
    assert len(chunked.decode([c])[0]) == c.shape[1] * 640


@pytest.mark.slow
def test_music_real_size_and_strict_hf_checkpoint(tmp_path):
    from safetensors.torch import save_file

    from anygpt.modalities.encodec import EncodecMusicCodec

    codec = EncodecMusicCodec.official()
    assert abs(sum(p.numel() for p in codec.parameters()) / 1e6 - 56.9) < 0.2
    (codes,) = codec.encode([tone(32000, 5.0, 1)])
    assert codes.shape == (4, 250)  # 5 s at 50 Hz, 4 codebooks
    assert len(codec.decode([codes])[0]) == 5 * 32000

    # facebook/encodec_32khz layout: config.json + model.safetensors with legacy weight-norm names.
    ckpt = tmp_path / "encodec_32khz"
    codec.model.config.save_pretrained(str(ckpt))
    sd = {k.replace("parametrizations.weight.original0", "weight_g").replace("parametrizations.weight.original1", "weight_v"): v.contiguous()
          for k, v in codec.model.state_dict().items()}
    assert "encoder.layers.0.conv.weight_g" in sd and "quantizer.layers.3.codebook.embed" in sd
    with torch.no_grad():
        sd["quantizer.layers.0.codebook.embed"].normal_()
    save_file(sd, str(ckpt / "model.safetensors"))
    loaded = build_codec("music", ckpt)
    torch.testing.assert_close(loaded.model.quantizer.layers[0].codebook.embed, sd["quantizer.layers.0.codebook.embed"])
    sd.pop("decoder.layers.0.conv.bias")
    save_file(sd, str(ckpt / "model.safetensors"))
    with pytest.raises(CodecError, match="encodec_32khz card.*does not match"):
        build_codec("music", ckpt)


# ------------------------------------------------------------------------------------- image ---


def test_image_tiny_encode_and_embedding():
    codec = build_codec("image", "tiny")
    assert (codec.num_codebooks, codec.codebook_size, codec.tokens_per_image) == (1, 8192, 32)
    assert codec.card["tokens_per_item"] == 32 and codec.lm_codebooks == 1
    codes = codec.encode([picture(0), picture(1, (300, 200)), np.asarray(picture(2))])
    assert [c.shape for c in codes] == [(1, 32)] * 3 and codes[0].dtype == np.int64
    emb = codec.codes_to_embedding(codes)
    assert tuple(emb.shape) == (3, 1024) and torch.isfinite(emb).all()
    with pytest.raises(CodecError, match="32 ids"):
        codec.codes_to_embedding(np.zeros((1, 31), np.int64))


def test_image_official_architecture_keys_on_meta_device():
    """The release's key names and shapes, without allocating 1.1 B parameters."""
    from anygpt.modalities.seed import SeedImageCodec

    with torch.device("meta"):
        codec = SeedImageCodec.official()
    shapes = {k: tuple(v.shape) for k, v in codec.state_dict().items()}
    expected = {
        "visual_encoder.patch_embed.proj.weight": (1408, 3, 14, 14),
        "visual_encoder.pos_embed": (1, 257, 1408),
        "visual_encoder.blocks.38.attn.q_bias": (1408,),
        "visual_encoder.blocks.38.mlp.fc1.weight": (6144, 1408),
        "ln_vision.weight": (1408,),
        "query_tokens": (1, 32, 768),
        "Qformer.bert.embeddings.LayerNorm.weight": (768,),
        "Qformer.bert.encoder.layer.0.crossattention.self.key.weight": (768, 1408),
        "Qformer.bert.encoder.layer.10.crossattention.output.dense.weight": (768, 768),
        "Qformer.bert.encoder.layer.11.attention.self.query.weight": (768, 768),
        "Qformer.bert.encoder.layer.11.intermediate_query.dense.weight": (3072, 768),
        "Qformer.bert.encoder.layer.11.output_query.LayerNorm.bias": (768,),
        "quantize.embedding.weight": (8192, 32),
        "encode_task_layer.2.weight": (32, 768),
        "decode_task_layer.2.weight": (768, 32),
        "pos_embed": (1, 32, 768),
        "blocks.3.attn.qkv.weight": (2304, 768),
        "pos_embed_image": (1, 32, 768),
        "blocks_image.3.mlp.fc2.weight": (768, 3072),
        "image_down.0.weight": (256, 768),
        "image_down.4.weight": (32, 128),
        "distill_image_proj.weight": (1024, 1024),
    }
    for k, shape in expected.items():
        assert shapes.get(k) == shape, k
    assert not any("Qformer.bert.encoder.layer.1.crossattention" in k for k in shapes)  # every 2nd layer
    assert not any(k.startswith("visual_encoder.blocks.39.") for k in shapes)
    assert 1.1e9 < sum(math.prod(s) for s in shapes.values()) < 1.2e9


def test_seed_modules_match_transformers_blip2():
    """Our EVA ViT + ln_vision and causal Q-Former compute what transformers' BLIP-2 modules compute
    with the same weights (Q-Former given SEED's causal query mask): an independent check of the math."""
    from transformers import Blip2QFormerConfig, Blip2QFormerModel, Blip2VisionConfig, Blip2VisionModel

    from anygpt.modalities.seed import TINY_CONFIG as cfg

    codec = build_codec("image", "tiny")
    with torch.no_grad():
        for p in codec.parameters():
            if p.dim() < 2:
                p.normal_(0, 0.2)  # non-trivial biases / LayerNorm affine
    sd = codec.state_dict()
    hq = Blip2QFormerModel(Blip2QFormerConfig(
        hidden_size=cfg["qformer_hidden"], num_hidden_layers=cfg["qformer_layers"], num_attention_heads=cfg["qformer_heads"],
        intermediate_size=cfg["qformer_intermediate"], encoder_hidden_size=cfg["vit_dim"],
        cross_attention_frequency=cfg["cross_attention_freq"])).eval()
    hq.load_state_dict({
        k[len("Qformer.bert."):].replace("embeddings.LayerNorm", "layernorm").replace(".self.", ".attention."): v
        for k, v in sd.items() if k.startswith("Qformer.bert.")}, strict=True)
    hv = Blip2VisionModel(Blip2VisionConfig(
        hidden_size=cfg["vit_dim"], num_hidden_layers=cfg["vit_depth"], num_attention_heads=cfg["vit_heads"],
        intermediate_size=int(cfg["vit_dim"] * cfg["vit_mlp_ratio"]), image_size=224, patch_size=14)).eval()
    vsd = {"embeddings.class_embedding": sd["visual_encoder.cls_token"],
           "embeddings.position_embedding": sd["visual_encoder.pos_embed"],
           "embeddings.patch_embedding.weight": sd["visual_encoder.patch_embed.proj.weight"],
           "embeddings.patch_embedding.bias": sd["visual_encoder.patch_embed.proj.bias"],
           "post_layernorm.weight": sd["ln_vision.weight"], "post_layernorm.bias": sd["ln_vision.bias"]}
    for i in range(cfg["vit_depth"]):
        p, h = f"visual_encoder.blocks.{i}.", f"encoder.layers.{i}."
        for ours, theirs in (("norm1", "layer_norm1"), ("norm2", "layer_norm2"), ("attn.proj", "self_attn.projection"),
                             ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
            vsd[f"{h}{theirs}.weight"], vsd[f"{h}{theirs}.bias"] = sd[f"{p}{ours}.weight"], sd[f"{p}{ours}.bias"]
        vsd[h + "self_attn.qkv.weight"] = sd[p + "attn.qkv.weight"]
        q_bias = sd[p + "attn.q_bias"]
        vsd[h + "self_attn.qkv.bias"] = torch.cat([q_bias, torch.zeros_like(q_bias), sd[p + "attn.v_bias"]])
    hv.load_state_dict(vsd, strict=True)

    x = torch.randn(2, 3, 224, 224)
    q = cfg["num_query_tokens"]
    with torch.no_grad():
        img = codec.ln_vision(codec.visual_encoder(x))
        # ln_vision uses eps 1e-5 (nn.LayerNorm default, as the release), BLIP-2's post_layernorm 1e-6
        torch.testing.assert_close(img, hv(pixel_values=x).last_hidden_state, atol=1e-4, rtol=1e-4)
        ours = codec.Qformer.bert(codec.query_tokens.expand(2, -1, -1), img)
        causal = torch.tril(torch.ones(q, q, dtype=torch.bool))[None, None].expand(2, 1, q, q)
        theirs = hq(query_embeds=codec.query_tokens.expand(2, -1, -1), attention_mask=causal,
                    encoder_hidden_states=img).last_hidden_state
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
        bidirectional = hq(query_embeds=codec.query_tokens.expand(2, -1, -1), encoder_hidden_states=img).last_hidden_state
        assert (ours - bidirectional).abs().max() > 1e-3  # the causal mask matters


def test_image_strict_loading_with_separate_vision_weights(tmp_path):
    codec = build_codec("image", "tiny")
    with torch.no_grad():
        codec.quantize.embedding.weight.normal_()
    pics = [picture(0), picture(1)]
    want = codec.encode(pics)
    codec.save(tmp_path / "full")
    again = build_codec("image", tmp_path / "full")
    assert all((a == b).all() for a, b in zip(want, again.encode(pics)))

    # Release layout: seed_quantizer.pt without the ViT + LAVIS eva_vit_g.pth (unprefixed keys),
    # plus keys of the unused text branch that the release checkpoint may carry.
    split = tmp_path / "split"
    split.mkdir()
    (split / "seed_config.json").write_text((tmp_path / "full" / "seed_config.json").read_text())
    sd = torch.load(tmp_path / "full" / "seed_quantizer.pt", weights_only=True)
    vis = {k[len("visual_encoder."):]: v for k, v in sd.items() if k.startswith("visual_encoder.")}
    rest = {k: v for k, v in sd.items() if not k.startswith("visual_encoder.")}
    rest["Qformer.bert.embeddings.position_ids"] = torch.arange(512)[None]
    rest["Qformer.bert.encoder.layer.0.intermediate.dense.weight"] = torch.zeros(3072, 64)
    torch.save(rest, split / "seed_quantizer.pt")
    with pytest.raises(CodecError, match="no visual_encoder.* weights.*eva_vit_g.pth"):
        build_codec("image", split)
    torch.save(vis, split / "eva_vit_g.pth")
    loaded = build_codec("image", split)
    assert all((a == b).all() for a, b in zip(want, loaded.encode(pics)))

    rest.pop("distill_image_proj.bias")
    torch.save(rest, split / "seed_quantizer.pt")
    with pytest.raises(CodecError, match="1 missing keys.*distill_image_proj.bias"):
        build_codec("image", split)


class _StubRenderer:
    """Stands in for UnclipRenderer: one image per embedding, colour from the embedding."""

    def __init__(self):
        self.calls = []

    def render(self, embeds, steps=None, guidance=None, seed=None):
        self.calls.append((tuple(embeds.shape), steps, seed))
        return [Image.new("RGB", (32, 32), tuple(int(v) % 256 for v in (e[:3] * 100).tolist())) for e in embeds]


def test_image_decode_calls_renderer_with_embedding():
    codec = build_codec("image", "tiny")
    stub = _StubRenderer()
    codec.renderer = stub
    codes = codec.encode([picture(0), picture(2)])
    imgs = codec.decode(codes, steps=2, seed=1)
    assert len(imgs) == 2 and all(isinstance(i, Image.Image) for i in imgs)
    assert stub.calls == [((2, 1024), 2, 1)]


def test_image_decode_with_real_unclip_renderer():
    unclip = pytest.importorskip("anygpt.decoders.unclip", reason="anygpt.decoders.unclip (UnclipRenderer) not written yet")
    codec = build_codec("image", "tiny")
    assert isinstance(codec.renderer, unclip.UnclipRenderer)
    imgs = codec.decode(codec.encode([picture(1)]), steps=1, seed=0)
    assert len(imgs) == 1 and isinstance(imgs[0], Image.Image)


# --------------------------------------------------------------------------------------- fit ---


def test_fit_makes_codes_differ_between_inputs(fitted_dir, media_files):
    from anygpt.modalities.fit import load_inputs

    for m in ("speech", "music", "image"):
        tiny = build_codec(m, "tiny")
        fitted = build_codec(m, fitted_dir / m)
        items = load_inputs(m, media_files[m], tiny)
        before = tiny.encode(items)
        after = fitted.encode(items)
        if m != "image":  # zero codebooks: every input gives the same (all-zero) codes
            assert all((c == before[0]).all() for c in before), m
        assert not (after[0] == after[1]).all() and not (after[1] == after[2]).all(), m
        distinct = len(np.unique(np.concatenate([c[0] for c in after])))
        assert distinct > 10, (m, distinct)
        card = yaml.safe_load((fitted_dir / m / "card.yaml").read_text())
        assert card["tiny"] is True and card["modality"] == m
        assert len(card["fitted"]["codebooks"]) == tiny.num_codebooks
        assert all(cb["used"] > 1 for cb in card["fitted"]["codebooks"]), card["fitted"]


def test_fit_codebooks_report_and_kmeans():
    from anygpt.modalities.fit import fit_codebooks, kmeans, usage

    x = torch.cat([torch.randn(50, 4) + 10, torch.randn(50, 4) - 10])
    c, counts = kmeans(x, 8, min_per_cluster=25)
    assert c.shape == (8, 4) and counts.sum() == 100
    assert usage(np.array([0, 0, 1, 1]), 4, "x").perplexity == pytest.approx(2.0)
    codec = build_codec("speech", "tiny")
    report = fit_codebooks(codec, [tone(16000, 1.0, k) for k in range(3)], iters=5)
    assert report.vectors == 150 and len(report.codebooks) == 8
    assert report.codebooks[0].used > 1 and report.codebooks[0].perplexity > 1
    few = fit_codebooks(build_codec("image", "tiny"), [picture(k) for k in range(3)], iters=2)
    assert few.notes and "32 slots per item" in few.summary()  # too few images for a shared 32-slot codebook
    assert "speech[0]:" in report.summary()
    assert codec.quantizer.vq.layers[0]._codebook.inited.item() == 1


def test_load_codecs_from_fitted_dir(fitted_dir):
    codecs = load_codecs(fitted_dir)
    assert set(codecs) == {"speech", "music", "image"}
    assert dir_card(fitted_dir / "speech")["_path"].endswith("card.yaml")


# ---------------------------------------------------------------------------------------- CLI ---


def test_cli_round_trips_wav_music_png(fitted_dir, media_files, tmp_path, capsys):
    from anygpt.modalities.cli import main

    # speech .wav (22.05 kHz in -> 16 kHz codes)
    assert main(["codec", "encode", "--modality", "speech", "--input", str(media_files["speech"][1]),
                 "--codecs", str(fitted_dir), "--out", str(tmp_path / "s.npy")]) == 0
    s = np.load(tmp_path / "s.npy")
    assert s.shape == (8, 50) and s.dtype == np.int64
    assert main(["codec", "decode", "--modality", "speech", "--input", str(tmp_path / "s.npy"),
                 "--codecs", str(fitted_dir), "--out", str(tmp_path / "s.wav")]) == 0
    info = sf.info(str(tmp_path / "s.wav"))
    assert info.samplerate == 16000 and info.frames == 16000 and info.channels == 1

    # music clip (stereo FLAC at 44.1 kHz -> mono 32 kHz)
    assert main(["codec", "encode", "--modality", "music", "--input", str(media_files["music"][0]),
                 "--tiny", "--out", str(tmp_path / "m.npy")]) == 0
    assert np.load(tmp_path / "m.npy").shape == (4, 50)
    assert main(["codec", "decode", "--modality", "music", "--input", str(tmp_path / "m.npy"),
                 "--codecs", str(fitted_dir / "music"), "--out", str(tmp_path / "m.wav")]) == 0
    info = sf.info(str(tmp_path / "m.wav"))
    assert info.samplerate == 32000 and info.frames == 32000

    # png -> 32 ids -> png (renderer: real UnclipRenderer when present, else a stub)
    assert main(["codec", "encode", "--modality", "image", "--input", str(media_files["image"][2]),
                 "--codecs", str(fitted_dir), "--out", str(tmp_path / "i.npy")]) == 0
    assert np.load(tmp_path / "i.npy").shape == (1, 32)
    try:
        import anygpt.decoders.unclip  # noqa: F401
    except ImportError:
        from anygpt.modalities.seed import SeedImageCodec

        orig = SeedImageCodec.renderer
        SeedImageCodec.renderer = property(lambda self: _StubRenderer())
    else:
        orig = None
    try:
        assert main(["codec", "decode", "--modality", "image", "--input", str(tmp_path / "i.npy"),
                     "--codecs", str(fitted_dir), "--out", str(tmp_path / "i.png"), "--steps", "1", "--seed", "0"]) == 0
    finally:
        if orig is not None:
            SeedImageCodec.renderer = orig
    assert Image.open(tmp_path / "i.png").mode == "RGB"
    out = capsys.readouterr().out
    assert "codes [8, 50]" in out and "codes [4, 50]" in out and "codes [1, 32]" in out and "real time" in out


def test_cli_errors_are_one_line(tmp_path, capsys):
    from anygpt.modalities.cli import main

    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF....garbage")
    assert main(["codec", "encode", "--modality", "speech", "--input", str(bad), "--tiny", "--out", str(tmp_path / "x.npy")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and str(bad) in err and len(err.splitlines()) == 1
    assert main(["codec", "decode", "--modality", "music", "--input", str(tmp_path / "missing.npy"), "--tiny",
                 "--out", str(tmp_path / "x.wav")]) == 1
    assert "missing.npy" in capsys.readouterr().err
    assert main(["codec", "encode", "--modality", "image", "--input", str(bad), "--codecs", str(tmp_path),
                 "--out", str(tmp_path / "x.npy")]) == 1
    assert "no 'image/' codec directory" in capsys.readouterr().err
    assert main(["codec", "encode", "--modality", "video", "--input", "x"]) == 2  # argparse usage error


def test_bench_codecs_tiny_table(capsys):
    from anygpt.modalities.bench import bench_codecs

    result = bench_codecs(seconds=0.5, batches=(2,), real=False)
    rows = result["rows"]
    assert {(r["modality"], r["codec"], r["batch"]) for r in rows} >= {
        ("speech", "speechtokenizer", 2), ("speech", "mimi", 2), ("music", "encodec_32khz", 2),
        ("image", "seed_tokenizer_2", 2)}
    for r in rows:
        assert r["encode_s"] > 0 and r["decode_s"] > 0
        if r["modality"] != "image":
            assert r["encode_x_realtime"] == pytest.approx(0.5 * r["batch"] / r["encode_s"], rel=0.05)
            assert r["lm_positions_per_s"] == {"speechtokenizer": 50, "mimi": 12.5, "encodec_32khz": 200}[r["codec"]]
    assert "x real time" in capsys.readouterr().out


def test_tiny_seed_codes_say_where_the_shape_is():
    """The tiny SEED config's sharp cross-attention keeps position in the fitted codes: the image whose
    codes agree most with a jittered rendering shows the shape in the same place (random keys: 0.1)."""
    from anygpt.demo.corpus import render_image
    from anygpt.modalities.fit import fit_codebooks
    from anygpt.modalities.seed import SeedImageCodec

    rng = np.random.default_rng(0)
    images, where = [], []
    for colour in ("red", "blue"):
        for position in ("left", "right", "top", "bottom"):
            for _ in range(3):
                images.append(render_image({"shape": "circle", "colour": colour, "position": position}, rng))
                where.append(position)
    codec = SeedImageCodec.tiny(seed=0)
    fit_codebooks(codec, images, iters=10, max_clusters=64)
    codes = np.stack([c[0] for c in codec.encode(images)])
    agree = (codes[:, None] == codes[None]).mean(-1)
    np.fill_diagonal(agree, -1.0)
    nearest = agree.argmax(1)
    assert np.mean([where[i] == where[j] for i, j in enumerate(nearest)]) >= 0.6  # chance 0.25
