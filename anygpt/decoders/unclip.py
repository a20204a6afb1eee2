"""Images from SEED embeddings: ``diffusers`` Stable unCLIP, conditioned on the 1024-d image embedding.

The SEED image tokenizer decodes its 32 codes into a CLIP ViT-H/14 image embedding (1024-d); Stable
Diffusion 2.1 unCLIP ("h" variant) renders pictures from exactly that embedding, passed as the UNet's
class input together with a noise-level embedding.  ``UnclipRenderer`` wraps
``StableUnCLIPImg2ImgPipeline`` loaded from a local directory in the
``stabilityai/stable-diffusion-2-1-unclip`` layout (no downloads at run time), and ``UnclipRenderer.tiny``
builds a random pipeline with the same components, small enough for CPU tests.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

# The components StableUnCLIPImg2ImgPipeline needs; the text side may be absent (prompt embeddings are
# then zeros), the image encoder must exist even when only embeddings are given (the pipeline reads its dtype).
REQUIRED_COMPONENTS = ("feature_extractor", "image_encoder", "image_normalizer", "image_noising_scheduler",
                       "unet", "scheduler", "vae")
OPTIONAL_COMPONENTS = ("tokenizer", "text_encoder")


class UnclipLoadError(ValueError):
    """The unCLIP pipeline directory is missing or incomplete."""


def _fresh_seed() -> int:
    return int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1)


def _default_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _dtype_kwarg() -> str:
    # diffusers 0.42 renamed `torch_dtype` to `dtype` (the old name warns); older releases only know the old one.
    try:
        from diffusers.utils import deprecation_utils
    except ImportError:
        return "torch_dtype"
    return "dtype" if hasattr(deprecation_utils, "_TORCH_DTYPE_DEPRECATION_MESSAGE") else "torch_dtype"


class _DropFallbackNote(logging.Filter):
    """Drops transformers' "`CLIPImageProcessor` requires torchvision ... falling back to
    `CLIPImageProcessorPil`" note: diffusers' unCLIP module imports that name at import time, and
    without torchvision transformers answers with the PIL processor (the one we want) plus the note."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision" not in record.getMessage()


def _unclip_pipeline_class() -> Any:
    """``StableUnCLIPImg2ImgPipeline``, imported without the torchvision fallback note (the PIL image
    processor it falls back to is the right one here: unCLIP conditions on embeddings, not pixels)."""
    from transformers.utils import logging as hf_logging

    logger = hf_logging.get_logger("transformers.utils.import_utils")
    note = _DropFallbackNote()
    logger.addFilter(note)
    try:
        from diffusers import StableUnCLIPImg2ImgPipeline
    finally:
        logger.removeFilter(note)
    return StableUnCLIPImg2ImgPipeline


def _default_dtype(device: torch.device, dtype: torch.dtype | None) -> torch.dtype:
    if dtype is not None:
        return dtype
    # SD 2.1 unCLIP ships fp16 weights and runs well in fp16 on GPU; CPU kernels want fp32.
    return torch.float16 if device.type == "cuda" else torch.float32


class UnclipRenderer:
    """Render SEED image embeddings ``[B, D]`` into PIL images with a Stable unCLIP pipeline."""

    def __init__(self, pipeline: Any, seed: int | None = None, progress: bool = False) -> None:
        self.pipe = pipeline
        self.seed = seed
        self.last_seed: int | None = None
        self.pipe.set_progress_bar_config(disable=not progress)

    # -- construction --------------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, path: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                 seed: int | None = None, progress: bool = False) -> "UnclipRenderer":
        """Load a local ``stable-diffusion-2-1-unclip``-layout directory (``model_index.json`` + components)."""
        StableUnCLIPImg2ImgPipeline = _unclip_pipeline_class()

        root = Path(path)
        index = root / "model_index.json"
        if not index.is_file():
            raise UnclipLoadError(f"{root}: not a diffusers pipeline directory (no model_index.json); expected the "
                                  f"stabilityai/stable-diffusion-2-1-unclip layout")
        try:
            listed = json.loads(index.read_text())
        except json.JSONDecodeError as exc:
            raise UnclipLoadError(f"{index}: invalid JSON ({exc})") from exc
        absent = [name for name in REQUIRED_COMPONENTS
                  if not isinstance(listed.get(name), list) or listed[name][0] is None or not (root / name).is_dir()]
        if absent:
            raise UnclipLoadError(f"{root}: unCLIP pipeline lacks component(s) {', '.join(absent)}")
        dev = _default_device(device)
        dt = _default_dtype(dev, dtype)
        try:
            pipe = StableUnCLIPImg2ImgPipeline.from_pretrained(str(root), local_files_only=True,
                                                               **{_dtype_kwarg(): dt})
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UnclipLoadError(f"{root}: cannot load unCLIP pipeline ({first})") from exc
        return cls(pipe.to(dev), seed=seed, progress=progress)

    @classmethod
    def tiny(cls, embed_dim: int = 1024, seed: int = 0, image_size: int = 32) -> "UnclipRenderer":
        """A small random pipeline with every real component (CPU tests, demo); images are noise-like."""
        StableUnCLIPImg2ImgPipeline = _unclip_pipeline_class()
        from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
        from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer
        from tokenizers.pre_tokenizers import ByteLevel
        from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTokenizer, CLIPVisionConfig,
                                  CLIPVisionModelWithProjection)

        try:  # transformers 5 without torchvision: the PIL backend, named directly to avoid a fallback warning
            from transformers import CLIPImageProcessorPil as ImageProcessor
        except ImportError:
            from transformers import CLIPImageProcessor as ImageProcessor

        if image_size % 16:
            raise ValueError(f"image_size must be a multiple of 16, got {image_size}")
        text_dim, max_tokens = 32, 16
        # A byte-level vocabulary without merges: every prompt tokenizes (one token per byte).  transformers 5
        # needs the vocab/merges objects themselves (vocab_file=/merges_file= are silently ignored).
        alphabet = sorted(ByteLevel.alphabet())
        specials = ["<|startoftext|>", "<|endoftext|>"]
        vocab = {tok: i for i, tok in enumerate(specials + alphabet + [a + "</w>" for a in alphabet])}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_tokens)
            text_encoder = CLIPTextModel(CLIPTextConfig(
                vocab_size=len(vocab), hidden_size=text_dim, intermediate_size=37, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=max_tokens, projection_dim=text_dim,
                bos_token_id=0, eos_token_id=1, pad_token_id=1))
            image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
                hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                image_size=image_size, patch_size=image_size // 4, projection_dim=embed_dim))
            feature_extractor = ImageProcessor(size={"shortest_edge": image_size},
                                                   crop_size={"height": image_size, "width": image_size})
            # The UNet's class input is [noised image embedding ; noise-level embedding], hence 2 * embed_dim.
            unet = UNet2DConditionModel(
                sample_size=image_size // 2, in_channels=4, out_channels=4, layers_per_block=1,
                block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=text_dim,
                attention_head_dim=(2, 4), use_linear_projection=True, class_embed_type="projection",
                projection_class_embeddings_input_dim=2 * embed_dim)
            vae = AutoencoderKL(
                in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
                down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), sample_size=image_size)
            normalizer = StableUnCLIPImageNormalizer(embedding_dim=embed_dim)
        pipe = StableUnCLIPImg2ImgPipeline(
            feature_extractor=feature_extractor, image_encoder=image_encoder, image_normalizer=normalizer,
            # the release's schedulers (stable-diffusion-2-1-unclip/*/scheduler_config.json)
            image_noising_scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2", num_train_timesteps=1000),
            tokenizer=tokenizer, text_encoder=text_encoder, unet=unet,
            scheduler=DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                    prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=False,
                                    steps_offset=1, num_train_timesteps=1000),
            vae=vae,
        )
        return cls(pipe.to("cpu"))

    def save(self, directory: str | Path) -> Path:
        """Write the pipeline in the diffusers layout that ``from_dir`` reads."""
        out = Path(directory)
        self.pipe.save_pretrained(str(out), safe_serialization=True)
        return out

    # -- properties ----------------------------------------------------------------------------------

    @property
    def embed_dim(self) -> int:
        """Width of the image embedding the pipeline is conditioned on (1024 for the "h" unCLIP)."""
        return int(self.pipe.image_normalizer.config.embedding_dim)

    @property
    def device(self) -> torch.device:
        return self.pipe.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.pipe.unet.dtype

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "UnclipRenderer":
        self.pipe.to(device=device, dtype=dtype)
        return self

    # -- rendering -----------------------------------------------------------------------------------

    @torch.no_grad()
    def render(
        self,
        embeds: Tensor | np.ndarray | Sequence[Sequence[float]],
        steps: int = 25,
        guidance: float = 10.0,
        seed: int | None = None,
        height: int | None = None,
        width: int | None = None,
        prompt: str = "",
        negative_prompt: str | None = None,
        noise_level: int = 0,
    ) -> list[Any]:
        """Render image embeddings ``[B, D]`` (or ``[D]``) into ``B`` PIL images.

        Args:
            steps: denoising steps.
            guidance: classifier-free guidance scale (> 1 enables it; unCLIP's unconditional branch is a
                zero image embedding).
            seed: fixes the noise (same seed -> identical images); otherwise the renderer's own ``seed``
                if one was set, else a fresh random seed per call (``self.last_seed`` records it).
            height, width: pixels, multiples of 8 (default: the UNet's native size, 768 for SD 2.1).
            prompt: optional text to steer the picture alongside the embedding (SEED uses none).
            noise_level: noise added to the embedding (higher -> more variation around it).
        """
        e = torch.as_tensor(np.asarray(embeds) if not isinstance(embeds, Tensor) else embeds)
        if e.ndim == 1:
            e = e[None]
        if e.ndim != 2 or e.shape[1] != self.embed_dim:
            raise ValueError(f"embeds must be [B, {self.embed_dim}], got {tuple(e.shape)}")
        if e.shape[0] == 0:
            return []
        if not torch.isfinite(e).all():
            raise ValueError("embeds contain NaN or infinite values")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        for name, value in (("height", height), ("width", width)):
            if value is not None and (value < 8 or value % 8):
                raise ValueError(f"{name} must be a positive multiple of 8, got {value}")
        batch = e.shape[0]
        e = e.to(device=self.device, dtype=self.dtype)

        chosen = seed if seed is not None else self.seed
        self.last_seed = _fresh_seed() if chosen is None else int(chosen)
        # A CPU generator gives the same noise on any device (diffusers draws on CPU and moves it).
        generator = torch.Generator("cpu").manual_seed(self.last_seed)

        text: dict[str, Any]
        if self.pipe.text_encoder is None or self.pipe.tokenizer is None:
            # Without a text encoder, condition on empty (zero) text: the image embedding carries the content.
            width_text = int(self.pipe.unet.config.cross_attention_dim)
            zeros = torch.zeros(batch, 1, width_text, device=self.device, dtype=self.dtype)
            text = {"prompt_embeds": zeros, "negative_prompt_embeds": zeros}
        else:
            text = {"prompt": [prompt] * batch}
            if negative_prompt is not None:
                text["negative_prompt"] = [negative_prompt] * batch
        result = self.pipe(
            image_embeds=e, num_inference_steps=steps, guidance_scale=guidance, generator=generator,
            height=height, width=width, noise_level=noise_level, output_type="pil", **text,
        )
        return list(result.images)


__all__ = ["UnclipLoadError", "UnclipRenderer"]
