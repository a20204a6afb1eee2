"""unCLIP image renderer: a tiny random Stable unCLIP pipeline renders SEED-sized embeddings on CPU."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from anygpt.decoders.unclip import UnclipLoadError, UnclipRenderer  # noqa: E402

EMBED_DIM = 1024  # SEED decodes to a CLIP ViT-H/14 image embedding


@pytest.fixture(scope="module")
def renderer() -> Iterator[UnclipRenderer]:
    # Tiny models: on a shared 2-core machine extra intra-op threads only contend with each other.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield UnclipRenderer.tiny(embed_dim=EMBED_DIM, seed=0)
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def embeds() -> torch.Tensor:
    return torch.randn(2, EMBED_DIM, generator=torch.Generator().manual_seed(0))


def pixels(images: list) -> list[np.ndarray]:
    return [np.asarray(im) for im in images]


def test_renders_requested_size(renderer: UnclipRenderer, embeds: torch.Tensor) -> None:
    images = renderer.render(embeds, steps=2, seed=0, height=48, width=32)
    assert len(images) == 2
    for im in images:
        assert im.size == (32, 48) and im.mode == "RGB"
    default = renderer.render(embeds[0], steps=2, seed=0)  # a single [D] embedding, native size
    assert len(default) == 1 and default[0].size == (32, 32)


def test_seed_fixed_and_fresh(renderer: UnclipRenderer, embeds: torch.Tensor) -> None:
    a = pixels(renderer.render(embeds, steps=2, seed=5))
    b = pixels(renderer.render(embeds, steps=2, seed=5))
    c = pixels(renderer.render(embeds, steps=2, seed=6))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0])
    # no seed: a fresh one per call, recorded so a picture can be reproduced
    d = pixels(renderer.render(embeds[:1], steps=2))
    first = renderer.last_seed
    e = pixels(renderer.render(embeds[:1], steps=2))
    assert isinstance(first, int) and renderer.last_seed != first
    assert not np.array_equal(d[0], e[0])
    again = pixels(renderer.render(embeds[:1], steps=2, seed=renderer.last_seed))
    assert np.array_equal(again[0], e[0])


def test_embedding_changes_image(renderer: UnclipRenderer, embeds: torch.Tensor) -> None:
    # same noise, different embeddings -> different pictures: the embedding conditions the UNet
    a, b = pixels(renderer.render(embeds, steps=2, seed=1, guidance=3.0))
    assert not np.array_equal(a, b)


def test_bad_inputs(renderer: UnclipRenderer) -> None:
    with pytest.raises(ValueError, match=r"embeds must be \[B, 1024\]"):
        renderer.render(torch.zeros(1, 768))
    with pytest.raises(ValueError, match="multiple of 8"):
        renderer.render(torch.zeros(1, EMBED_DIM), height=30)
    with pytest.raises(ValueError, match="NaN"):
        renderer.render(torch.full((1, EMBED_DIM), float("nan")))


def test_save_from_dir_round_trip(renderer: UnclipRenderer, embeds: torch.Tensor, tmp_path: Path) -> None:
    renderer.save(tmp_path / "unclip")
    index = json.loads((tmp_path / "unclip" / "model_index.json").read_text())
    assert index["_class_name"] == "StableUnCLIPImg2ImgPipeline"
    loaded = UnclipRenderer.from_dir(tmp_path / "unclip", device="cpu")
    assert loaded.embed_dim == EMBED_DIM and loaded.dtype == torch.float32
    a = pixels(renderer.render(embeds, steps=2, seed=3))
    b = pixels(loaded.render(embeds, steps=2, seed=3))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_from_dir_errors(tmp_path: Path) -> None:
    with pytest.raises(UnclipLoadError, match="no model_index.json"):
        UnclipRenderer.from_dir(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableUnCLIPImg2ImgPipeline",
                                                           "unet": ["diffusers", "UNet2DConditionModel"]}))
    with pytest.raises(UnclipLoadError, match="lacks component.*feature_extractor"):
        UnclipRenderer.from_dir(tmp_path)


def test_without_text_encoder(embeds: torch.Tensor) -> None:
    # A pipeline without its text side still renders: the prompt is replaced by zero text embeddings.
    r = UnclipRenderer.tiny(embed_dim=64, seed=1)
    r.pipe.text_encoder = None
    r.pipe.tokenizer = None
    images = r.render(torch.randn(1, 64), steps=2, seed=0)
    assert images[0].size == (32, 32)
