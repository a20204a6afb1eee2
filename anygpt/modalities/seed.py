"""Image codec: the SEED-2 tokenizer (Ge et al., 2023, "Making LLaMA SEE and Draw with SEED Tokenizer").

Encode: 224x224 image (bicubic resize, CLIP mean/std) -> EVA-CLIP ViT-g/14 -> ``ln_vision`` -> causal
Q-Former (BERT-base sized, 32 learned queries, cross-attention to the image every 2nd layer, the
queries attend causally to each other) -> ``encode_task_layer`` (768 -> 768 -> 32) -> nearest entry of
an 8192 x 32 codebook -> 32 ids per image.
Decode: ids -> codebook -> ``decode_task_layer`` (32 -> 768) -> + ``pos_embed_image`` -> 4 ViT blocks
(``blocks_image``) -> ``image_down`` MLP (768 -> 256 -> 128 -> 32 per query) -> flatten (32 x 32) ->
``distill_image_proj`` -> the 1024-d image embedding of Stable unCLIP (SD 2.1-unclip), which the
renderer (``anygpt.decoders.unclip``) turns into pixels.

Why it is written here: SEED has no PyPI package, its code pulls LAVIS/timm/torchvision, and the
release loads weights with ``strict=False`` (silently keeping random weights on a key mismatch).
We implement the same modules with the same attribute names as the release, so the state dict of
this codec *is* the ``seed_quantizer.pt`` layout (``visual_encoder.*``, ``ln_vision``,
``Qformer.bert.*``, ``query_tokens``, ``quantize.embedding``, ``encode_task_layer``,
``decode_task_layer``, ``pos_embed``/``blocks``, ``pos_embed_image``/``blocks_image``,
``image_down``, ``distill_image_proj``): every one of those must load, and the keys of branches we
do not build (the Q-Former's text branch, the reverse Q-Former) are reported and ignored.  The EVA ViT-g weights may live inside
``seed_quantizer.pt`` or in a separate LAVIS ``eva_vit_g.pth`` (keys without the
``visual_encoder.`` prefix), as the release fetched them separately.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from anygpt.modalities.base import Codec, CodecError
from anygpt.modalities.cards import card_label, check_codec_matches, dir_card, load_weights, named_card, resolve_files, write_card
from anygpt.modalities.media import MediaError, image_to_tensor, load_image

WEIGHTS_NAME = "seed_quantizer.pt"
ARCH_NAME = "seed_config.json"
VISION_NAME = "eva_vit_g.pth"
RENDERER_DIR = "unclip"

# The released SEED-2 tokenizer (qformer_quantizer.Blip2QformerQuantizer defaults + EVA ViT-g).
OFFICIAL_CONFIG: dict[str, Any] = {
    "image_size": 224,
    "patch_size": 14,
    "vit_dim": 1408,
    "vit_depth": 39,
    "vit_heads": 16,
    "vit_mlp_ratio": 4.3637,
    "qformer_hidden": 768,
    "qformer_layers": 12,
    "qformer_heads": 12,
    "qformer_intermediate": 3072,
    "cross_attention_freq": 2,
    "num_query_tokens": 32,
    "codebook_size": 8192,
    "codebook_dim": 32,
    "decode_depth": 4,
    "decode_heads": 12,
    "image_features_dim": 1024,
}

# Same code path, small widths.  32 queries x 8192 codes stay (the vocabulary depends on them; the
# release only applies the causal query mask for exactly 32 queries) and so does the 224 px input
# and the 1024-d unCLIP embedding the renderer consumes.
TINY_CONFIG: dict[str, Any] = {
    **OFFICIAL_CONFIG,
    "vit_dim": 64,
    "vit_depth": 2,
    "vit_heads": 4,
    "qformer_hidden": 64,
    "qformer_layers": 2,
    "qformer_heads": 4,
    "qformer_intermediate": 128,
    "decode_depth": 1,
    "decode_heads": 4,
    # A trained ViT encodes *where* things are; a random one with the usual 0.02-std position
    # embedding drowns position under patch content, so tiny codes ignored it (measured: position
    # at chance, 0.2 vs 0.25).  A unit-std random position embedding keeps position in the codes.
    "vit_pos_std": 1.0,
    # A trained Q-Former's queries attend to parts of the image; random keys give near-uniform
    # cross-attention, so every query sees the patch *average* and the fitted codes keep colour but
    # lose where the shape is (measured on the demo corpus, nearest-neighbour on codes: position
    # 0.15-0.30 vs chance 0.25).  Keys 30x larger make each query attend to a few patches (chosen by
    # their position embedding): position 0.98-1.0, colour 1.0.
    "qformer_cross_key_gain": 30.0,
}

# ---------------------------------------------------------------------------------- ViT (EVA) ---


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class EvaAttention(nn.Module):
    """EVA/BEiT attention: bias-free ``qkv`` plus separate ``q_bias``/``v_bias`` (k has no bias)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, bias).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class EvaBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = EvaAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _PatchEmbed(nn.Module):
    def __init__(self, image_size: int, patch: int, dim: int) -> None:
        super().__init__()
        self.image_size = image_size
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            raise CodecError(f"SEED ViT expects {self.image_size}x{self.image_size} input, got {tuple(x.shape[-2:])}")
        return self.proj(x).flatten(2).transpose(1, 2)


class EvaViT(nn.Module):
    """EVA-CLIP ViT-g/14 as used by BLIP-2/SEED: all tokens of the last block, no final norm."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        dim = cfg["vit_dim"]
        self.num_features = dim
        self.patch_embed = _PatchEmbed(cfg["image_size"], cfg["patch_size"], dim)
        n = (cfg["image_size"] // cfg["patch_size"]) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, dim))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        std = float(cfg.get("vit_pos_std", 0.02))
        nn.init.trunc_normal_(self.pos_embed, std=std, a=-2 * std, b=2 * std)
        self.blocks = nn.ModuleList([EvaBlock(dim, cfg["vit_heads"], cfg["vit_mlp_ratio"]) for _ in range(cfg["vit_depth"])])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1) + self.pos_embed.to(x.dtype)
        for blk in self.blocks:
            x = blk(x)
        return x


# ---------------------------------------------------------------------------- causal Q-Former ---


class _BertSelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, kv_width: int) -> None:
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(kv_width, hidden)
        self.value = nn.Linear(kv_width, hidden)

    def forward(self, x: torch.Tensor, kv: torch.Tensor, causal: bool) -> torch.Tensor:
        b, n, c = x.shape
        h = self.heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(t.shape[0], t.shape[1], h, -1).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.query(x)), split(self.key(kv)), split(self.value(kv)),
                                             is_causal=causal)
        return out.transpose(1, 2).reshape(b, n, c)


class _BertSelfOutput(nn.Module):
    def __init__(self, hidden: int, inner: int, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(inner, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class _BertAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, kv_width: int, eps: float) -> None:
        super().__init__()
        self.self = _BertSelfAttention(hidden, heads, kv_width)
        self.output = _BertSelfOutput(hidden, hidden, eps)

    def forward(self, x: torch.Tensor, kv: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        return self.output(self.self(x, x if kv is None else kv, causal), x)


class _BertIntermediate(nn.Module):
    def __init__(self, hidden: int, inner: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class _QFormerLayer(nn.Module):
    """One Q-Former layer, query branch only (the text branch is unused by the tokenizer)."""

    def __init__(self, cfg: dict[str, Any], index: int, eps: float = 1e-12) -> None:
        super().__init__()
        hid, heads = cfg["qformer_hidden"], cfg["qformer_heads"]
        self.attention = _BertAttention(hid, heads, hid, eps)
        self.has_cross_attention = index % cfg["cross_attention_freq"] == 0
        if self.has_cross_attention:
            self.crossattention = _BertAttention(hid, heads, cfg["vit_dim"], eps)
            with torch.no_grad():  # initialisation only; loaded checkpoints overwrite it
                self.crossattention.self.key.weight.mul_(float(cfg.get("qformer_cross_key_gain", 1.0)))
        self.intermediate_query = _BertIntermediate(hid, cfg["qformer_intermediate"])
        self.output_query = _BertSelfOutput(hid, cfg["qformer_intermediate"], eps)

    def forward(self, x: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, causal=True)  # SEED: query i sees queries <= i
        if self.has_cross_attention:
            x = self.crossattention(x, image)
        return self.output_query(self.intermediate_query(x), x)


class _BertEncoder(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.layer = nn.ModuleList([_QFormerLayer(cfg, i) for i in range(cfg["qformer_layers"])])


class _BertEmbeddings(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.LayerNorm = nn.LayerNorm(hidden, eps=1e-12)


class _Bert(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.embeddings = _BertEmbeddings(cfg["qformer_hidden"])
        self.encoder = _BertEncoder(cfg)

    def forward(self, queries: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        x = self.embeddings.LayerNorm(queries)
        for layer in self.encoder.layer:
            x = layer(x, image)
        return x


class CausalQFormer(nn.Module):
    """Holder giving the release's ``Qformer.bert.*`` key names."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.bert = _Bert(cfg)


# ----------------------------------------------------------------------- decode-side ViT block ---


class _ViTAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class ViTBlock(nn.Module):
    """Pre-norm transformer block (timm/LAVIS ``vit.Block`` layout: norm1, attn.qkv, attn.proj, norm2, mlp)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _ViTAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VectorQuantizer(nn.Module):
    """Nearest-neighbour codebook (``quantize.embedding.weight``: 8192 x 32)."""

    def __init__(self, n_e: int, e_dim: int) -> None:
        super().__init__()
        self.n_e, self.e_dim = n_e, e_dim
        self.embedding = nn.Embedding(n_e, e_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_e, 1.0 / n_e)  # release init

    def encode(self, z: torch.Tensor) -> torch.Tensor:
        flat = z.reshape(-1, self.e_dim).float()
        w = self.embedding.weight.float()
        d = flat.pow(2).sum(1, keepdim=True) + w.pow(2).sum(1)[None] - 2 * flat @ w.t()
        return d.argmin(dim=1).view(z.shape[:-1])


# ------------------------------------------------------------------------------------ the codec ---


class SeedImageCodec(Codec):
    """SEED-2 tokenizer as a codec: PIL images (or paths) <-> ``[1, 32]`` code arrays.

    ``codes_to_embedding(codes) -> [B, 1024]`` gives the unCLIP image embedding; ``decode`` renders
    it with ``self.renderer`` (an ``anygpt.decoders.unclip.UnclipRenderer``, built lazily from
    ``<codec dir>/unclip/`` when present, else tiny).
    """

    card_name = "seed_tokenizer_2"
    sample_rate = None
    frame_rate = None

    def __init__(self, config: dict[str, Any] | None = None, card: dict[str, Any] | None = None,
                 use_half: bool = False, renderer_dir: str | os.PathLike | None = None) -> None:
        super().__init__()
        cfg = {**OFFICIAL_CONFIG, **(config or {})}
        self.config = cfg
        self.card = card if card is not None else named_card(self.card_name)
        self.num_codebooks = 1
        self.codebook_size = int(cfg["codebook_size"])
        self.tokens_per_image = int(cfg["num_query_tokens"])
        self.image_size = int(cfg["image_size"])
        self.embed_dim = int(cfg["image_features_dim"])
        self.use_half = use_half
        self.renderer_dir = Path(renderer_dir) if renderer_dir is not None else None
        hid, q = cfg["qformer_hidden"], cfg["num_query_tokens"]

        # ---- release attribute names (== seed_quantizer.pt keys) ----
        self.visual_encoder = EvaViT(cfg)
        self.ln_vision = nn.LayerNorm(cfg["vit_dim"])
        self.Qformer = CausalQFormer(cfg)
        self.query_tokens = nn.Parameter(torch.zeros(1, q, hid).normal_(0.0, 0.02))
        self.quantize = VectorQuantizer(cfg["codebook_size"], cfg["codebook_dim"])
        self.encode_task_layer = nn.Sequential(nn.Linear(hid, hid), nn.Tanh(), nn.Linear(hid, cfg["codebook_dim"]))
        self.decode_task_layer = nn.Sequential(nn.Linear(cfg["codebook_dim"], cfg["codebook_dim"]), nn.Tanh(),
                                               nn.Linear(cfg["codebook_dim"], hid))
        # recon_s branch: trained to reconstruct Q-Former features; kept for strict loading only.
        self.pos_embed = nn.Parameter(torch.zeros(1, q, hid))
        self.blocks = nn.ModuleList([ViTBlock(hid, cfg["decode_heads"]) for _ in range(cfg["decode_depth"])])
        # generation branch: codes -> unCLIP image embedding.
        self.pos_embed_image = nn.Parameter(torch.zeros(1, q, hid))
        self.blocks_image = nn.ModuleList([ViTBlock(hid, cfg["decode_heads"]) for _ in range(cfg["decode_depth"])])
        self.image_down = nn.Sequential(
            nn.Linear(hid, 256, bias=False), nn.ReLU(),
            nn.Linear(256, 128, bias=False), nn.ReLU(),
            nn.Linear(128, 32, bias=False),
        )
        self.distill_image_proj = nn.Linear(q * 32, cfg["image_features_dim"])
        self.eval()

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def tiny(cls, *, seed: int | None = 0, **kwargs: Any) -> "SeedImageCodec":
        """Small random SEED tokenizer (same code path): 224 px in, 32 ids of 8192, 1024-d embedding."""
        overrides = kwargs.pop("config", {}) or {}
        device = kwargs.pop("device", None)
        return cls._tiny_from(lambda: cls({**TINY_CONFIG, **overrides}, **kwargs), seed, device)

    @classmethod
    def official(cls, **kwargs: Any) -> "SeedImageCodec":
        """The released architecture (EVA ViT-g + Q-Former, ~1.1 B parameters), randomly initialised.

        Build it under ``torch.device("meta")`` to inspect keys/shapes without allocating memory.
        """
        device = kwargs.pop("device", None)
        codec = cls(dict(OFFICIAL_CONFIG), **kwargs)
        return codec.to(device) if device is not None else codec

    @classmethod
    def from_dir(cls, directory: Path | str, card: dict[str, Any] | None = None, **kwargs: Any) -> "SeedImageCodec":
        """Load ``seed_quantizer.pt`` (+ ``eva_vit_g.pth`` when the ViT is not inside it).

        Every parameter of the inference graph must be there with its shape; the release's keys of
        branches this graph does not build (the Q-Former's text branch, the reverse Q-Former, the
        EVA classifier head ...) are reported once, grouped by prefix, and ignored, as SEED's own
        loader does.
        """
        directory = Path(directory)
        card = card or dir_card(directory) or named_card(cls.card_name)
        files = resolve_files(card, directory)
        cfg = dict(OFFICIAL_CONFIG)
        if "arch" in files:
            try:
                cfg.update(json.loads(files["arch"].read_text(encoding="utf-8")))
            except (OSError, ValueError) as exc:
                raise CodecError(f"{card_label(card)}: cannot read {files['arch']} ({exc})") from None
        device = kwargs.pop("device", None)
        renderer_dir = directory / RENDERER_DIR if (directory / RENDERER_DIR).is_dir() else None
        kwargs.setdefault("renderer_dir", renderer_dir)
        check_codec_matches(card, codebook_size=int(cfg["codebook_size"]), tokens_per_item=int(cfg["num_query_tokens"]))
        sd = _torch_load(files["weights"], card)
        if not any(k.startswith("visual_encoder.") for k in sd):
            if "vision" not in files:
                raise CodecError(f"{card_label(card)}: {files['weights']} holds no visual_encoder.* weights and "
                                 f"{directory} lacks the EVA ViT-g file ({' | '.join(card.get('optional_files', {}).get('vision', [VISION_NAME]))})")
            vis = _torch_load(files["vision"], card)
            sd.update({f"visual_encoder.{k}": v for k, v in vis.items()})
        with torch.device("meta"):  # 1.1 B parameters: skip random init, the checkpoint provides them
            codec = cls(cfg, card=card, **kwargs)
        load_weights(codec, sd, card, files["weights"], assign=True)
        if device is not None:
            codec.to(device)
        return codec

    def save(self, directory: str | os.PathLike, **card_updates: Any) -> None:
        """Write ``seed_quantizer.pt`` (full state dict, ViT included) + ``seed_config.json`` + ``card.yaml``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.detach().cpu() for k, v in self.state_dict().items()}, directory / WEIGHTS_NAME)
        (directory / ARCH_NAME).write_text(json.dumps(self.config, indent=2), encoding="utf-8")
        if self.renderer_dir is not None and self.renderer_dir.resolve() != (directory / RENDERER_DIR).resolve():
            shutil.copytree(self.renderer_dir, directory / RENDERER_DIR, dirs_exist_ok=True)
        write_card(self.card, directory, **card_updates)

    # ---- tensors ---------------------------------------------------------------------------------

    def _autocast(self):
        enabled = self.use_half and self.device.type == "cuda"
        return torch.autocast(device_type=self.device.type, dtype=torch.float16, enabled=enabled)

    def preprocess(self, items: Sequence[Any]) -> torch.Tensor:
        """PIL images / paths / HxWx3 uint8 arrays -> ``[B, 3, 224, 224]`` (bicubic, CLIP mean/std)."""
        from PIL import Image

        imgs = []
        for i, item in enumerate(items):
            if isinstance(item, (str, os.PathLike)):
                imgs.append(load_image(item))
            elif isinstance(item, Image.Image):
                imgs.append(load_image(item, name=f"image item {i}"))
            elif isinstance(item, np.ndarray) and item.ndim == 3 and item.shape[2] in (3, 4):
                imgs.append(load_image(Image.fromarray(item.astype(np.uint8)), name=f"image item {i}"))
            else:
                raise MediaError(f"image item {i}: expected a PIL image, a path or an HxWx3 array, "
                                 f"got {type(item).__name__}")
        return image_to_tensor(imgs, self.image_size)

    @torch.inference_mode()
    def query_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, 3, 224, 224]`` -> the 32 query vectors before quantisation ``[B, 32, codebook_dim]``."""
        pixels = pixels.to(self.device, torch.float32)
        with self._autocast():
            image = self.visual_encoder(pixels)
        image = self.ln_vision(image.float())  # release: LayerNorm computed in float32
        with self._autocast():
            q = self.Qformer.bert(self.query_tokens.expand(pixels.shape[0], -1, -1), image)
            z = self.encode_task_layer(q.float())
        return z.float()

    @torch.inference_mode()
    def encode_tensor(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, 3, 224, 224]`` -> ids ``[B, 32]``."""
        return self.quantize.encode(self.query_features(pixels))

    @torch.inference_mode()
    def codes_to_embedding(self, codes: Any) -> torch.Tensor:
        """ids ``[B, 32]`` (or a list of ``[1, 32]`` arrays) -> unCLIP image embedding ``[B, 1024]``."""
        if isinstance(codes, (list, tuple)):
            codes = np.stack([np.asarray(c).reshape(-1) for c in codes])
        ids = torch.as_tensor(np.asarray(codes) if not torch.is_tensor(codes) else codes).to(self.device, torch.long)
        if ids.dim() == 3:
            ids = ids.squeeze(1)
        if ids.dim() == 1:
            ids = ids[None]
        if ids.shape[-1] != self.tokens_per_image:
            raise CodecError(f"image codes: expected {self.tokens_per_image} ids per image, got {ids.shape[-1]}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.codebook_size):
            raise CodecError(f"image codes must lie in [0, {self.codebook_size}); got [{int(ids.min())}, {int(ids.max())}]")
        x = self.decode_task_layer(self.quantize.embedding(ids))
        x = x + self.pos_embed_image
        for blk in self.blocks_image:
            x = blk(x)
        x = self.image_down(x).reshape(x.shape[0], -1)
        return self.distill_image_proj(x).float()

    # ---- renderer ----------------------------------------------------------------------------------

    @property
    def renderer(self) -> Any:
        """The unCLIP renderer, built on first use (kept out of the state dict)."""
        r = self.__dict__.get("_renderer")
        if r is None:
            try:
                from anygpt.decoders.unclip import UnclipRenderer
            except ImportError as exc:
                raise CodecError(f"image decode needs anygpt.decoders.unclip ({exc})") from None
            if self.renderer_dir is not None:
                r = UnclipRenderer.from_dir(self.renderer_dir)
            else:
                r = UnclipRenderer.tiny(embed_dim=self.embed_dim)
            if hasattr(r, "to"):
                r = r.to(self.device) or r
            self.__dict__["_renderer"] = r
        return r

    @renderer.setter
    def renderer(self, value: Any) -> None:
        self.__dict__["_renderer"] = value

    # ---- codec contract ---------------------------------------------------------------------------

    def encode(self, items: Sequence[Any]) -> list[np.ndarray]:
        """Images (PIL / path / array) -> ``[1, 32]`` int64 arrays."""
        if len(items) == 0:
            return []
        ids = self.encode_tensor(self.preprocess(items)).cpu().numpy().astype(np.int64)
        return [row[None, :] for row in ids]

    def decode(self, codes: Sequence[np.ndarray], **render_kwargs: Any) -> list[Any]:
        """``[1, 32]`` arrays -> PIL images via ``renderer.render(codes_to_embedding(codes))``.

        ``render_kwargs`` (``steps``, ``guidance``, ``seed``) go to the renderer unchanged.
        """
        if len(codes) == 0:
            return []
        emb = self.codes_to_embedding(list(codes))
        return list(self.renderer.render(emb, **render_kwargs))

    # ---- fitting hooks -------------------------------------------------------------------------------

    def fit_vectors(self, items: Sequence[Any]) -> torch.Tensor:
        """The 32 query vectors of every image, ``[32 * N, codebook_dim]`` (what the VQ quantises)."""
        rows = []
        for start in range(0, len(items), 8):
            z = self.query_features(self.preprocess(items[start: start + 8]))
            rows.append(z.reshape(-1, z.shape[-1]).cpu())
        return torch.cat(rows).float()

    def codebooks(self) -> list[nn.Embedding]:
        return [self.quantize.embedding]


def _torch_load(path: Path, card: dict[str, Any]) -> dict[str, torch.Tensor]:
    try:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CodecError(f"{card_label(card)}: cannot load {path} ({' '.join(str(exc).split())[:200]})") from None
    for key in ("model", "state_dict", "module"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise CodecError(f"{card_label(card)}: {path} does not hold a state dict")
    return dict(sd)


__all__ = ["SeedImageCodec", "OFFICIAL_CONFIG", "TINY_CONFIG", "WEIGHTS_NAME", "VISION_NAME"]
