"""SoundStorm-style acoustic decoder: an RVQ codec's leading (LM) codebooks -> all its codebooks.

The LM generates only the leading ``lm_codebooks`` codebooks of a speech codec (SpeechTokenizer: RVQ
layer 1, the semantic content at 50 Hz; Mimi: its semantic codebook); the codec's decoder needs all
of them to render audio.  This module fills in the rest the way SoundStorm (arXiv 2305.09636) does,
as AnyGPT did.  Every count comes from the codec's card (:meth:`SoundStormConfig.from_card`):
``num_quantizers`` = the card's ``num_codebooks``, ``codebook_size``, ``semantic_codebooks`` =
``lm_codebooks`` (the condition), ``frame_rate``.

- a conformer (rotary self-attention, depthwise-convolution module, macaron feed-forwards) runs over
  *frames*; each frame's input is the sum of one embedding per acoustic codebook (every codebook has
  its own table with a trailing mask token) plus one embedding per conditioning codebook, so the
  decoder is conditioned frame by frame on the LM's codes and the sequence length stays T rather
  than K*T;
- one head per acoustic codebook predicts that codebook's codes;
- training is MaskGIT-style: a random prompt cut (frames before it are given in full, which is what
  teaches zero-shot voice continuation), a random acoustic codebook q, a cosine-scheduled random subset
  of q's non-prompt frames masked, every codebook above q masked, codebooks below q given;
  cross-entropy on the masked positions of codebook q;
- decoding is codebook by codebook, coarse to fine, with a few confidence-ranked parallel steps for
  the first acoustic codebook and (by default) a single greedy step for the finer ones; a voice
  prompt's full codes are prepended unmasked, so the output continues the prompt's voice.

``SoundStorm.load_anygpt_release`` reads the AnyGPT release checkpoint
(``speechtokenizer_soundstorm_mls.pt``, built on lucidrains' soundstorm-pytorch conformer) by renaming
its keys onto ours; it accepts both conformer conv-module layouts that exist in the wild (AnyGPT
issue 15 / soundstorm-speechtokenizer issue 9).  Our own checkpoints are ``config.json`` +
``model.safetensors`` (``save_pretrained`` / ``from_pretrained``).  Both loaders ignore checkpoint
keys outside the modules they build (reported once, grouped by prefix) and fail, naming the keys,
only on missing or mis-shaped ones.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from anygpt import modalities as registry
from anygpt.modalities.cards import keys_by_prefix, card_label

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_NAME = "anygpt-soundstorm"
FORMAT_VERSION = 1

# SoundStorm decodes the first acoustic layer in several steps and the finer ones greedily in one:
# the first layer carries most of the speaker/prosody information, later layers are near-deterministic
# given it (SoundStorm paper, section 3.2; AnyGPT used 4 steps with `num_full_sampling_levels=1`).
# A shorter codec repeats the last value, a longer one is cut (see SoundStorm._step_schedule).
DEFAULT_STEPS: tuple[int, ...] = (8, 1, 1, 1, 1, 1, 1)

# Architecture sizes (the codec facts come from a card).  "release" is AnyGPT's released decoder
# (anygpt/src/infer/voice_clone.py: dim 1024, 12 blocks, 8 heads of 128), ~350 M parameters with
# SpeechTokenizer's 8 x 1024 codes; "tiny" is the CPU test/demo size with the same code path.
SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(dim=64, depth=2, heads=2, dim_head=32, ff_mult=2, conv_expansion=2, conv_kernel_size=7),
    "small": dict(dim=256, depth=4, heads=4, dim_head=64, ff_mult=4, conv_expansion=2, conv_kernel_size=31),
    "base": dict(dim=512, depth=8, heads=8, dim_head=64, ff_mult=4, conv_expansion=2, conv_kernel_size=31),
    "release": dict(dim=1024, depth=12, heads=8, dim_head=128, ff_mult=4, conv_expansion=2, conv_kernel_size=31),
}


class SoundStormLoadError(ValueError):
    """A SoundStorm checkpoint could not be read, does not match the model, or not the codec's card."""


def acoustic_modality(name: str | None = None) -> str:
    """The registered modality whose plugin takes an acoustic prompt (speech), or check ``name`` is one.

    Asked of the registry, never written out: a plugin that sets ``acoustic_prompt = True`` gets this
    decoder.  Several such modalities need ``name``.
    """
    found = [m for m, plugin in registry.registered().items() if plugin.acoustic_prompt]
    if name is not None:
        if name not in found:
            raise registry.CodecError(f"modality {name!r} has no acoustic decoder (acoustic modalities: "
                                      f"{', '.join(found) or 'none'})")
        return name
    if len(found) != 1:
        raise registry.CodecError(f"{len(found)} registered modalities take an acoustic prompt "
                                  f"({', '.join(found) or 'none'}); name the one to use")
    return found[0]


# --------------------------------------------------------------------------------------------------
# configuration


@dataclass
class SoundStormConfig:
    """Sizes of a SoundStorm decoder and the codec facts it was built for.

    ``num_quantizers`` counts *all* codebooks of the codec (8 for SpeechTokenizer); the leading
    ``semantic_codebooks`` (the card's ``lm_codebooks``: what the LM generates) are the condition, the
    other ``num_acoustic`` are generated.  ``frame_rate``, ``codec`` and ``modality`` record the card
    the decoder was built from (None in decoders saved before they were recorded); :meth:`check_card`
    compares them with a codec's card.
    """

    codebook_size: int
    num_quantizers: int
    semantic_vocab_size: int
    semantic_codebooks: int = 1
    dim: int = 1024
    depth: int = 12
    heads: int = 8
    dim_head: int = 128
    ff_mult: int = 4
    conv_expansion: int = 2
    conv_kernel_size: int = 31
    dropout: float = 0.0
    rotary_theta: float = 10000.0
    frame_rate: float | None = None
    codec: str | None = None
    modality: str | None = None

    def __post_init__(self) -> None:
        for name in ("codebook_size", "semantic_vocab_size", "semantic_codebooks", "dim", "depth", "heads",
                     "dim_head", "ff_mult", "conv_expansion", "conv_kernel_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"SoundStormConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_quantizers <= self.semantic_codebooks:
            raise ValueError(f"SoundStormConfig.num_quantizers must exceed semantic_codebooks "
                             f"({self.semantic_codebooks}): nothing to generate with {self.num_quantizers}")
        if self.dim_head % 2:
            raise ValueError(f"SoundStormConfig.dim_head must be even for rotary embeddings, got {self.dim_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"SoundStormConfig.dropout must be in [0, 1), got {self.dropout}")

    @property
    def num_acoustic(self) -> int:
        """Number of generated (acoustic) codebooks."""
        return self.num_quantizers - self.semantic_codebooks

    @classmethod
    def from_card(cls, card: Mapping[str, Any], size: str = "release", **overrides: Any) -> "SoundStormConfig":
        """A decoder for the codec a card describes, with the architecture of ``size`` (:data:`SIZES`).

        Args:
            card: the codec's card (``anygpt.modalities.codec_card`` / ``directory_cards``).
            size: ``tiny``, ``small``, ``base`` or ``release``.
            overrides: any other field (``dropout=0.1``, ``depth=4``).
        """
        if size not in SIZES:
            raise ValueError(f"unknown SoundStorm size {size!r}; use one of {', '.join(SIZES)}")
        facts = dict(codebook_size=int(card["codebook_size"]), num_quantizers=int(card["num_codebooks"]),
                     semantic_vocab_size=int(card["codebook_size"]), semantic_codebooks=int(card["lm_codebooks"]),
                     frame_rate=None if card.get("frame_rate") is None else float(card["frame_rate"]),
                     codec=card.get("name"), modality=card.get("modality"))
        return cls(**{**facts, **SIZES[size], **overrides})

    @classmethod
    def anygpt_release(cls, card: Mapping[str, Any] | None = None) -> "SoundStormConfig":
        """The sizes of AnyGPT's released ``speechtokenizer_soundstorm_mls.pt`` for ``card`` (default:
        the acoustic modality's default codec card, SpeechTokenizer)."""
        return cls.from_card(card or registry.codec_card(acoustic_modality()), "release")

    @classmethod
    def tiny(cls, card: Mapping[str, Any] | None = None, **overrides: Any) -> "SoundStormConfig":
        """Same architecture as the release, small enough for CPU tests and the demo, for ``card``
        (default: the acoustic modality's default codec card)."""
        return cls.from_card(card or registry.codec_card(acoustic_modality()), "tiny", **overrides)

    def check_card(self, card: Mapping[str, Any], where: str = "SoundStorm decoder") -> None:
        """Raise a one-line ``SoundStormLoadError`` naming ``where`` and the card when they disagree."""
        want = {"num_quantizers": ("num_codebooks", int(card["num_codebooks"])),
                "codebook_size": ("codebook_size", int(card["codebook_size"])),
                "semantic_vocab_size": ("codebook_size", int(card["codebook_size"])),
                "semantic_codebooks": ("lm_codebooks", int(card["lm_codebooks"]))}
        if self.frame_rate is not None and card.get("frame_rate") is not None:
            want["frame_rate"] = ("frame_rate", float(card["frame_rate"]))
        bad = [f"{ours}={getattr(self, ours)} (card {theirs}={value})" for ours, (theirs, value) in want.items()
               if getattr(self, ours) != value]
        if bad:
            raise SoundStormLoadError(f"{where} does not fit the {card_label(dict(card))}: {', '.join(bad)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SoundStormConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SoundStormLoadError(f"unknown SoundStorm config keys: {', '.join(unknown)}")
        try:
            return cls(**dict(data))
        except (TypeError, ValueError) as exc:
            raise SoundStormLoadError(f"invalid SoundStorm config: {exc}") from None


# --------------------------------------------------------------------------------------------------
# conformer


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rotary_tables(n: int, dim_head: int, theta: float, device: torch.device) -> tuple[Tensor, Tensor]:
    # Computed per call instead of kept as a buffer so the model can be built on the meta device and
    # loaded with `assign=True` (no 1.4 GB random init for the release size).  fp32 on purpose: rotary
    # angles lose precision in half types at long lengths.
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim_head, 2, device=device, dtype=torch.float32) / dim_head))
    freqs = torch.outer(torch.arange(n, device=device, dtype=torch.float32), inv_freq)
    freqs = torch.cat((freqs, freqs), dim=-1)  # "rotate half" layout over the full head dim, as the release
    return freqs.cos(), freqs.sin()


def _apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    xf = x.float()
    return (xf * cos + _rotate_half(xf) * sin).to(x.dtype)


class FeedForward(nn.Module):
    """Pre-norm feed-forward with Swish; used twice per block with weight 1/2 (macaron)."""

    def __init__(self, dim: int, mult: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, dim * mult)
        self.down = nn.Linear(dim * mult, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        h = self.dropout(F.silu(self.up(self.norm(x))))
        return self.dropout(self.down(h))


class Attention(nn.Module):
    """Pre-norm bidirectional multi-head self-attention with rotary positions and a key-padding mask."""

    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.dropout = dropout
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim)

    def forward(self, x: Tensor, valid: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        b, n, _ = x.shape
        h = self.norm(x)
        q = self.to_q(h)
        k, v = self.to_kv(h).chunk(2, dim=-1)
        q, k, v = (t.view(b, n, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        q, k = _apply_rotary(q, cos, sin), _apply_rotary(k, cos, sin)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=valid[:, None, None, :],
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class ConvModule(nn.Module):
    """Conformer convolution module: pointwise conv + GLU, depthwise conv, Swish, channel norm, pointwise.

    Padded frames are zeroed before and after the depthwise conv so that padding never leaks into real
    frames (batched and unbatched decoding then agree).
    """

    def __init__(self, dim: int, expansion: int, kernel_size: int, dropout: float) -> None:
        super().__init__()
        inner = dim * expansion
        self.norm = nn.LayerNorm(dim)
        self.pointwise_in = nn.Conv1d(dim, inner * 2, 1)
        self.depthwise = nn.Conv1d(inner, inner, kernel_size, groups=inner)
        # Channel LayerNorm without a bias, as in the release (only a gain is learned).
        self.chan_norm_gamma = nn.Parameter(torch.ones(1, inner, 1))
        self.pointwise_out = nn.Conv1d(inner, dim, 1)
        self.dropout = nn.Dropout(dropout)
        pad = kernel_size // 2
        self.padding = (pad, pad - (kernel_size + 1) % 2)  # "same" length for odd and even kernels

    def _chan_norm(self, x: Tensor) -> Tensor:
        # Clamp (not add) the variance, with a dtype-dependent floor: matches the release numerically.
        eps = 1e-6 if x.dtype == torch.float32 else 1e-4
        var = torch.var(x, dim=1, unbiased=False, keepdim=True)
        mean = torch.mean(x, dim=1, keepdim=True)
        return (x - mean) * var.clamp(min=eps).rsqrt() * self.chan_norm_gamma

    def forward(self, x: Tensor, valid: Tensor) -> Tensor:
        keep = valid[:, None, :]
        h = self.norm(x).transpose(1, 2)
        h = F.glu(self.pointwise_in(h), dim=1)
        h = h.masked_fill(~keep, 0.0)
        h = self.depthwise(F.pad(h, self.padding)).masked_fill(~keep, 0.0)
        h = self._chan_norm(F.silu(h))
        return self.dropout(self.pointwise_out(h).transpose(1, 2))


class ConformerBlock(nn.Module):
    """Macaron conformer block: 1/2 FF, attention, convolution, 1/2 FF, final LayerNorm."""

    def __init__(self, cfg: SoundStormConfig) -> None:
        super().__init__()
        self.ff1 = FeedForward(cfg.dim, cfg.ff_mult, cfg.dropout)
        self.attn = Attention(cfg.dim, cfg.heads, cfg.dim_head, cfg.dropout)
        self.conv = ConvModule(cfg.dim, cfg.conv_expansion, cfg.conv_kernel_size, cfg.dropout)
        self.ff2 = FeedForward(cfg.dim, cfg.ff_mult, cfg.dropout)
        self.post_norm = nn.LayerNorm(cfg.dim)

    def forward(self, x: Tensor, valid: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x = x + 0.5 * self.ff1(x)
        x = x + self.attn(x, valid, cos, sin)
        x = x + self.conv(x, valid)
        x = x + 0.5 * self.ff2(x)
        return self.post_norm(x)


# --------------------------------------------------------------------------------------------------
# the model


def _as_long_tensor(x: Tensor | np.ndarray | Sequence[int], device: torch.device) -> Tensor:
    if isinstance(x, Tensor):
        return x.to(device=device, dtype=torch.long)
    return torch.as_tensor(np.asarray(x), dtype=torch.long, device=device)


def _fresh_seed() -> int:
    return int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1)


class SoundStorm(nn.Module):
    """Masked parallel decoder of a codec's acoustic codebooks conditioned on its leading (LM) ones.

    Codes follow the codec contract: ``[num_quantizers, T]`` per utterance, batched as
    ``[B, num_quantizers, T]``; rows ``:semantic_codebooks`` are the condition (SpeechTokenizer: row 0,
    the semantic layer), the rest are generated.
    """

    def __init__(self, config: SoundStormConfig) -> None:
        super().__init__()
        self.config = config
        q, c, d = config.num_acoustic, config.codebook_size, config.dim
        self.mask_id = c  # local id of the mask token in every acoustic layer's table
        # One table per conditioning codebook, back to back (codebook j's id x is row j*V+x); with one
        # semantic codebook this is exactly the release's `semantic_token_emb`.
        self.semantic_emb = nn.Embedding(config.semantic_codebooks * config.semantic_vocab_size, d)
        # One table per acoustic layer (codebook_size codes + 1 mask token), stored back to back in a
        # single embedding so that a frame's lookups are one gather; layer k's id x is row k*(c+1)+x.
        self.code_emb = nn.Embedding(q * (c + 1), d)
        self.layers = nn.ModuleList(ConformerBlock(config) for _ in range(config.depth))
        # Each frame's hidden state is expanded into one vector per acoustic layer, normalised, and
        # projected by that layer's own output matrix (per-layer heads).
        self.head_proj = nn.Linear(d, d * q)
        self.head_norm = nn.LayerNorm(d)
        self.head_weight = nn.Parameter(torch.empty(q, d, c))
        self.head_bias = nn.Parameter(torch.empty(q, c))
        bound = d ** -0.5
        nn.init.uniform_(self.head_weight, -bound, bound)
        nn.init.uniform_(self.head_bias, -bound, bound)
        self.last_seed: int | None = None

    # -- core ----------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.code_emb.weight.device

    def _semantic_rows(self, semantic: Tensor) -> Tensor:
        """``[B, S, N]`` conditioning ids; ``[B, N]`` is accepted when there is one codebook."""
        if semantic.ndim == 2 and self.config.semantic_codebooks == 1:
            return semantic[:, None]
        return semantic

    def _hidden(self, acoustic: Tensor, semantic: Tensor, valid: Tensor) -> Tensor:
        """[B, Q, N] acoustic ids (mask id allowed), [B, S, N] semantic, [B, N] valid -> [B, N, Q, D]."""
        b, q, n = acoustic.shape
        cfg = self.config
        offsets = torch.arange(q, device=acoustic.device) * (cfg.codebook_size + 1)
        x = self.code_emb(acoustic + offsets[None, :, None]).sum(dim=1)
        sem_offsets = torch.arange(semantic.shape[1], device=semantic.device) * cfg.semantic_vocab_size
        sem_ids = (semantic + sem_offsets[None, :, None]).masked_fill(~valid[:, None, :], 0)
        sem = self.semantic_emb(sem_ids).sum(dim=1)
        x = x + sem * valid[..., None].to(sem.dtype)
        cos, sin = _rotary_tables(n, cfg.dim_head, cfg.rotary_theta, x.device)
        # A row with no valid frame (an empty utterance in a padded batch) would give softmax over no
        # keys (NaN); let it attend everywhere instead, its outputs are discarded anyway.
        attend = valid | ~valid.any(dim=1, keepdim=True)
        for layer in self.layers:
            x = layer(x, attend, cos, sin)
        return self.head_proj(x).view(b, n, q, cfg.dim)

    def _layer_logits(self, hidden: Tensor, layer: Tensor | int) -> Tensor:
        """Logits of one acoustic layer per batch row ([B] tensor or an int): -> [B, N, C]."""
        if isinstance(layer, int):
            h = self.head_norm(hidden[:, :, layer])
            return h @ self.head_weight[layer] + self.head_bias[layer]
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        h = self.head_norm(hidden[rows, :, layer])  # [B, N, D]
        return torch.einsum("bnd,bdc->bnc", h, self.head_weight[layer]) + self.head_bias[layer][:, None, :]

    def forward(self, acoustic: Tensor, semantic: Tensor, valid: Tensor | None = None) -> Tensor:
        """Logits of every acoustic layer: ``acoustic [B, Q, N]`` (mask id = codebook_size), ``semantic
        [B, S, N]`` (or ``[B, N]`` for one codebook) -> ``[B, N, Q, C]``."""
        semantic = self._semantic_rows(semantic)
        if valid is None:
            valid = torch.ones(semantic.shape[0], semantic.shape[2], dtype=torch.bool, device=semantic.device)
        hidden = self.head_norm(self._hidden(acoustic, semantic, valid))
        return torch.einsum("bnqd,qdc->bnqc", hidden, self.head_weight) + self.head_bias

    def _check_ids(self, ids: Tensor, valid: Tensor, limit: int, what: str) -> None:
        bad = ((ids < 0) | (ids >= limit)) & valid
        if bool(bad.any()):
            value = int(ids[bad][0])
            raise ValueError(f"{what} must be in [0, {limit}), found {value}")

    # -- training ------------------------------------------------------------------------------------

    def loss(self, codes: Tensor, lengths: Tensor | Sequence[int] | None = None,
             generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, float]]:
        """MaskGIT loss on a batch of full codes ``[B, num_quantizers, T]`` (padding beyond ``lengths``).

        Rows ``:semantic_codebooks`` are the condition, the rest the acoustic layers.  Per utterance:
        prompt cut ``t`` uniform in ``[0, len-1)``; acoustic layer ``q`` uniform; a
        cos(pi/2 * u) fraction (u ~ U(0,1), at least one frame) of layer q's frames after ``t`` masked;
        layers above q masked after ``t``; loss = cross-entropy on the masked frames of layer q.
        Returns the mean loss over all masked tokens and float statistics (loss, acc, masked, mask_ratio).
        """
        cfg = self.config
        device = self.device
        codes = _as_long_tensor(codes, device)
        if codes.ndim != 3 or codes.shape[1] != cfg.num_quantizers:
            raise ValueError(f"codes must be [B, {cfg.num_quantizers}, T], got {tuple(codes.shape)}")
        b, _, t_max = codes.shape
        if t_max < 1:
            raise ValueError("codes must have at least one frame")
        if lengths is None:
            lengths_t = torch.full((b,), t_max, device=device, dtype=torch.long)
        else:
            lengths_t = _as_long_tensor(lengths, device)
        if lengths_t.shape != (b,) or bool((lengths_t < 1).any()) or bool((lengths_t > t_max).any()):
            raise ValueError(f"lengths must be {b} values in [1, {t_max}], got {lengths_t.tolist()}")

        pos = torch.arange(t_max, device=device)
        valid = pos[None, :] < lengths_t[:, None]
        semantic, acoustic = codes[:, :cfg.semantic_codebooks], codes[:, cfg.semantic_codebooks:]
        self._check_ids(semantic, valid[:, None, :], cfg.semantic_vocab_size, "semantic ids")
        self._check_ids(acoustic, valid[:, None, :], cfg.codebook_size, "acoustic codes")

        def rand(*shape: int) -> Tensor:
            return torch.rand(*shape, device=device, generator=generator)

        # Prompt cut: frames before `cut` are a fully given "voice prompt"; at least one frame stays
        # after it so every utterance contributes a target.
        cut = (rand(b) * (lengths_t - 1).float()).long()
        region = valid & (pos[None, :] >= cut[:, None])
        n_region = region.sum(dim=1)
        layer = (rand(b) * cfg.num_acoustic).long().clamp(max=cfg.num_acoustic - 1)
        ratio = torch.cos(rand(b) * (math.pi / 2))  # cosine schedule: masks many tokens more often
        n_mask = torch.minimum(torch.ceil(ratio * n_region).long().clamp(min=1), n_region)
        scores = rand(b, t_max).masked_fill(~region, 2.0)  # region frames first, in random order
        target = scores.argsort(dim=1).argsort(dim=1) < n_mask[:, None]

        k = torch.arange(cfg.num_acoustic, device=device)[None, :, None]
        above = (k > layer[:, None, None]) & region[:, None, :]
        at = (k == layer[:, None, None]) & target[:, None, :]
        inputs = acoustic.masked_fill(above | at | ~valid[:, None, :], self.mask_id)

        hidden = self._hidden(inputs, semantic, valid)
        logits = self._layer_logits(hidden, layer)
        labels = acoustic.gather(1, layer[:, None, None].expand(b, 1, t_max)).squeeze(1)
        picked = logits[target].float()
        wanted = labels[target]
        loss = F.cross_entropy(picked, wanted)
        with torch.no_grad():
            acc = (picked.argmax(dim=-1) == wanted).float().mean()
        stats = {
            "loss": float(loss.detach()),
            "acc": float(acc),
            "masked": float(target.sum()),
            "mask_ratio": float((n_mask.float() / n_region.float()).mean()),
        }
        return loss, stats

    # -- decoding ------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        semantic: Tensor | np.ndarray | Sequence[int],
        prompt: Tensor | np.ndarray | None = None,
        steps: Sequence[int] | int = DEFAULT_STEPS,
        temperature: float = 1.0,
        seed: int | None = None,
        lengths: Tensor | Sequence[int] | None = None,
        greedy_single_step: bool = True,
        include_prompt: bool = False,
    ) -> Tensor:
        """Fill in the acoustic codebooks for the LM's codes -> codes ``[B, num_quantizers, T]``.

        Args:
            semantic: the conditioning codes, ``[B, S, T]`` (S = ``semantic_codebooks``), or with one
                conditioning codebook ``[B, T]`` / ``[T]``, or ``[S, T]`` for one utterance with several;
                rows ``:S`` of the output are exactly these.
            prompt: optional voice prompt, full codes ``[num_quantizers, Tp]`` of one utterance in the
                target voice; it is prepended unmasked (its codes stay as they are) and excluded from the
                output, so the output continues the prompt's speaker and recording conditions.
            steps: parallel decoding steps per acoustic layer (coarsest first); a shorter list repeats
                its last value, an int means that many steps for the first and 1 for the rest.
            temperature: sampling temperature; 0 means greedy everywhere.
            seed: fixes the sampling noise (same seed -> same codes); a fresh seed otherwise
                (``self.last_seed`` records it).
            lengths: valid frames per row when ``semantic`` is padded; padded output frames hold 0.
            greedy_single_step: decode one-step layers by argmax (SoundStorm's choice for fine layers).
            include_prompt: return ``[B, Q, Tp + T]`` with the (unchanged) prompt in front, e.g. to
                decode prompt and continuation as one waveform.
        """
        cfg = self.config
        device = self.device
        n_sem = cfg.semantic_codebooks
        sem = _as_long_tensor(semantic, device)
        if n_sem == 1 and sem.ndim in (1, 2):
            sem = sem.reshape(-1, 1, sem.shape[-1])  # [T] or [B, T]
        elif n_sem > 1 and sem.ndim == 2:
            sem = sem[None]  # [S, T]: one utterance
        if sem.ndim != 3 or sem.shape[1] != n_sem:
            raise ValueError(f"semantic must be [B, {n_sem}, T]" + (" or [B, T] or [T]" if n_sem == 1 else
                                                                     f" or [{n_sem}, T]")
                             + f", got {tuple(sem.shape)}")
        b, _, t = sem.shape
        step_list = self._step_schedule(steps)
        if lengths is None:
            lengths_t = torch.full((b,), t, device=device, dtype=torch.long)
        else:
            lengths_t = _as_long_tensor(lengths, device)
            if lengths_t.shape != (b,) or bool((lengths_t < 0).any()) or bool((lengths_t > t).any()):
                raise ValueError(f"lengths must be {b} values in [0, {t}], got {lengths_t.tolist()}")
        valid_gen = torch.arange(t, device=device)[None, :] < lengths_t[:, None]
        self._check_ids(sem, valid_gen[:, None, :], cfg.semantic_vocab_size, "semantic ids")

        if prompt is not None:
            p = _as_long_tensor(prompt, device)
            if p.ndim == 3 and p.shape[0] == 1:
                p = p[0]
            if p.ndim != 2 or p.shape[0] != cfg.num_quantizers:
                raise ValueError(f"prompt must be codes [{cfg.num_quantizers}, Tp], got {tuple(p.shape)}")
            ones = torch.ones(p.shape[1], dtype=torch.bool, device=device)
            self._check_ids(p[:n_sem], ones[None], cfg.semantic_vocab_size, "prompt semantic ids")
            self._check_ids(p[n_sem:], ones[None], cfg.codebook_size, "prompt acoustic codes")
        else:
            p = torch.zeros(cfg.num_quantizers, 0, dtype=torch.long, device=device)
        tp = p.shape[1]
        if t == 0:  # nothing to decode
            empty = sem.new_zeros(b, cfg.num_quantizers, 0)
            return torch.cat([p[None].expand(b, -1, -1), empty], dim=2) if include_prompt else empty

        full_sem = torch.cat([p[:n_sem][None].expand(b, -1, -1), sem], dim=2)
        valid = torch.cat([torch.ones(b, tp, dtype=torch.bool, device=device), valid_gen], dim=1)
        acoustic = torch.full((b, cfg.num_acoustic, tp + t), self.mask_id, dtype=torch.long, device=device)
        acoustic[:, :, :tp] = p[n_sem:][None]
        region = torch.cat([torch.zeros(b, tp, dtype=torch.bool, device=device), valid_gen], dim=1)
        n_total = region.sum(dim=1)

        self.last_seed = _fresh_seed() if seed is None else int(seed)
        gen = torch.Generator(device=device)
        gen.manual_seed(self.last_seed)

        was_training = self.training
        self.eval()
        try:
            for k, n_steps in enumerate(step_list):
                masked = region.clone()
                for s in range(n_steps):
                    logits = self._layer_logits(self._hidden(acoustic, full_sem, valid), k).float()
                    greedy = temperature <= 0 or (n_steps == 1 and greedy_single_step)
                    if greedy:
                        probs = logits.softmax(dim=-1)
                        sampled = probs.argmax(dim=-1)
                    else:
                        probs = (logits / temperature).softmax(dim=-1)
                        flat = torch.multinomial(probs.view(-1, probs.shape[-1]), 1, generator=gen)
                        sampled = flat.view(probs.shape[:-1])
                    # Frames still to be re-masked after this step follow the cosine schedule; the
                    # least confident sampled ones stay masked.  Gumbel noise on the confidence
                    # (annealed to 0) keeps early choices from collapsing onto the easiest frames.
                    n_keep = torch.floor(n_total.float() * math.cos(math.pi / 2 * (s + 1) / n_steps)).long()
                    n_keep = torch.minimum(n_keep, (masked.sum(dim=1) - 1).clamp(min=0))
                    conf = probs.gather(-1, sampled[..., None]).squeeze(-1).clamp_min(1e-20).log()
                    noise_scale = 0.0 if greedy else temperature * (1.0 - (s + 1) / n_steps)
                    if noise_scale > 0:
                        u = torch.rand(conf.shape, device=device, generator=gen).clamp(1e-20, 1.0)
                        conf = conf + noise_scale * -torch.log(-torch.log(u).clamp_min(1e-20))
                    conf = conf.masked_fill(~masked, float("inf"))
                    keep_masked = (conf.argsort(dim=1).argsort(dim=1) < n_keep[:, None]) & masked
                    fill = masked & ~keep_masked
                    acoustic[:, k] = torch.where(fill, sampled, acoustic[:, k])
                    masked = keep_masked
        finally:
            self.train(was_training)

        # Rows :S are the conditioning input as given; padded frames' acoustic codes read 0.
        codes = torch.cat([full_sem, acoustic.masked_fill(~valid[:, None, :], 0)], dim=1)
        return codes if include_prompt else codes[:, :, tp:]

    def _step_schedule(self, steps: Sequence[int] | int) -> list[int]:
        q = self.config.num_acoustic
        if isinstance(steps, int):
            step_list = [steps] + [1] * (q - 1)
        else:
            step_list = [int(s) for s in steps]
            if not step_list:
                raise ValueError("steps must not be empty")
            step_list = (step_list + [step_list[-1]] * q)[:q]
        if any(s < 1 for s in step_list):
            raise ValueError(f"every layer needs at least one decoding step, got {step_list}")
        return step_list

    # -- persistence ---------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``config.json`` and ``model.safetensors`` (fp32 unless the model is in another dtype).

        Each file is written under a temporary name and renamed, so a reader never sees half a file.
        """
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **self.config.to_dict()}
        tmp = out / f".{WEIGHTS_NAME}.tmp-{os.getpid()}"
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(tensors, str(tmp), metadata={"format": FORMAT_NAME})
        os.replace(tmp, out / WEIGHTS_NAME)
        tmp = out / f".{CONFIG_NAME}.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(tmp, out / CONFIG_NAME)
        return out

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None, card: Mapping[str, Any] | None = None) -> "SoundStorm":
        """Load a directory written by ``save_pretrained``.

        Args:
            directory: holds ``config.json`` and ``model.safetensors``.
            device, dtype: where and in which type to put the weights (default: as stored, on CPU).
            card: the speech codec's card the codes will be decoded with; a decoder built for another
                codec (codebooks, codebook size, LM codebooks, frame rate) is a one-line error naming both.
        """
        src = Path(directory)
        missing = [name for name in (CONFIG_NAME, WEIGHTS_NAME) if not (src / name).is_file()]
        if missing:
            raise SoundStormLoadError(f"{src}: not a SoundStorm directory (missing {', '.join(missing)})")
        try:
            meta = json.loads((src / CONFIG_NAME).read_text())
        except json.JSONDecodeError as exc:
            raise SoundStormLoadError(f"{src / CONFIG_NAME}: invalid JSON ({exc})") from exc
        fmt = meta.pop("format", None)
        meta.pop("format_version", None)
        if fmt not in (None, FORMAT_NAME):
            raise SoundStormLoadError(f"{src / CONFIG_NAME}: format {fmt!r} is not {FORMAT_NAME!r}")
        try:
            config = SoundStormConfig.from_dict(meta)
        except SoundStormLoadError as exc:
            raise SoundStormLoadError(f"{src / CONFIG_NAME}: {exc}") from None
        if card is not None:
            config.check_card(card, f"SoundStorm decoder {src}")
        state = load_file(str(src / WEIGHTS_NAME))
        return cls._from_state_dict(config, state, str(src / WEIGHTS_NAME), device, dtype)

    @classmethod
    def _from_state_dict(cls, config: SoundStormConfig, state: Mapping[str, Tensor], source: str,
                         device: str | torch.device | None, dtype: torch.dtype | None) -> "SoundStorm":
        # Build on the meta device and adopt the loaded tensors: no wasted random init, no 2x memory.
        with torch.device("meta"):
            model = cls(config)
        unused = model.check_state_dict(state, source)
        model.load_state_dict({k: v for k, v in state.items() if k not in unused}, strict=True, assign=True)
        if dtype is not None:
            model = model.to(dtype=dtype)
        if device is not None:
            model = model.to(device)
        return model.eval()

    def check_state_dict(self, state: Mapping[str, Tensor], source: str = "state dict") -> list[str]:
        """Check a state dict against this model; returns the keys it does not use.

        Keys outside the modules this model builds (other heads, training-only buffers of another
        implementation) are reported once, grouped by prefix, and ignored; a missing or mis-shaped
        key would leave a random weight in place, so those raise one ``SoundStormLoadError`` line
        naming them.
        """
        expected = {k: tuple(v.shape) for k, v in self.state_dict().items()}
        missing = [k for k in expected if k not in state]
        unused = [k for k in state if k not in expected]
        shapes = [f"{k} {tuple(state[k].shape)} != {expected[k]}" for k in expected
                  if k in state and tuple(state[k].shape) != expected[k]]
        if missing or shapes:
            def brief(items: list[str]) -> str:
                head = ", ".join(items[:3])
                return f"{head}, ... ({len(items)} in all)" if len(items) > 3 else head

            c = self.config
            parts = []
            if missing:
                parts.append(f"missing {brief(missing)}")
            if shapes:
                parts.append(f"shape mismatch {brief(shapes)}")
            raise SoundStormLoadError(
                f"{source}: does not fit SoundStorm(dim={c.dim}, depth={c.depth}, codebooks={c.num_quantizers}, "
                f"codebook={c.codebook_size}): " + "; ".join(parts))
        if unused:
            log.warning("%s: holds %d keys this SoundStorm decoder does not use (ignored): %s", source,
                        len(unused), keys_by_prefix(unused))
        return unused

    # -- the AnyGPT release --------------------------------------------------------------------------

    @classmethod
    def load_anygpt_release(
        cls,
        path: str | Path | Mapping[str, Tensor],
        config: SoundStormConfig | None = None,
        heads: int = 8,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = torch.float32,
        card: Mapping[str, Any] | None = None,
    ) -> "SoundStorm":
        """Load AnyGPT's ``speechtokenizer_soundstorm_mls.pt`` (or a state dict with its key layout).

        Sizes are read from the tensor shapes unless ``config`` is given; only the number of attention
        heads cannot be (the release used 8 heads of 128).  Both conv-module layouts load: AnyGPT's
        ``conv.net1/ds_conv/net2`` split and the single ``conv.net.{0,2,4,6,7}`` Sequential of upstream
        soundstorm-speechtokenizer; loading one with the other's code is AnyGPT issue 15.  With
        ``card`` (the speech codec's), the checkpoint must fit it and the config records its facts.
        """
        if isinstance(path, Mapping):
            raw: Mapping[str, Any] = path
            source = "release state dict"
        else:
            file = Path(path)
            if not file.is_file():
                raise SoundStormLoadError(f"{file}: SoundStorm release checkpoint not found")
            try:
                raw = torch.load(str(file), map_location="cpu", weights_only=True)
            except Exception as exc:  # pickle/zip errors come in many types
                raise SoundStormLoadError(f"{file}: cannot read checkpoint ({type(exc).__name__}: {exc})") from exc
            source = str(file)
        state = release_to_state_dict(_unwrap_checkpoint(raw, source))
        if config is None:
            config = _infer_release_config(state, heads, source, card)
        if card is not None:
            config.check_card(card, f"SoundStorm release {source}")
        return cls._from_state_dict(config, state, source, device, dtype)


# --------------------------------------------------------------------------------------------------
# release key layout


_L = r"net\.conformer\.layers\.(\d+)\."
# (release key pattern, our key template).  Release modules: Scale(0.5, PreNorm(FeedForward)) for ff1/ff2,
# PreNorm(Attention) for attn, ConformerConvModule for conv, EinMix for the per-layer output matrices.
_RELEASE_RULES: list[tuple[re.Pattern[str], str]] = [(re.compile(p + r"\Z"), r) for p, r in [
    (r"semantic_token_emb\.weight", "semantic_emb.weight"),
    (r"net\.code_embeds\.weight", "code_emb.weight"),
    (r"net\.heads\.0\.(weight|bias)", r"head_proj.\1"),
    (r"net\.to_logits\.0\.(weight|bias)", r"head_norm.\1"),
    (r"net\.to_logits\.2\.weight", "head_weight"),
    (r"net\.to_logits\.2\.bias", "head_bias"),
    (_L + r"(ff[12])\.fn\.norm\.(weight|bias)", r"layers.\1.\2.norm.\3"),
    (_L + r"(ff[12])\.fn\.fn\.net\.0\.(weight|bias)", r"layers.\1.\2.up.\3"),
    (_L + r"(ff[12])\.fn\.fn\.net\.3\.(weight|bias)", r"layers.\1.\2.down.\3"),
    (_L + r"attn\.norm\.(weight|bias)", r"layers.\1.attn.norm.\2"),
    (_L + r"attn\.fn\.(to_q|to_kv)\.weight", r"layers.\1.attn.\2.weight"),
    (_L + r"attn\.fn\.to_out\.(weight|bias)", r"layers.\1.attn.to_out.\2"),
    # AnyGPT's copy of the conformer splits the conv module (to mask padding around the depthwise conv)
    (_L + r"conv\.net1\.0\.(weight|bias)", r"layers.\1.conv.norm.\2"),
    (_L + r"conv\.net1\.2\.(weight|bias)", r"layers.\1.conv.pointwise_in.\2"),
    (_L + r"conv\.ds_conv\.conv\.(weight|bias)", r"layers.\1.conv.depthwise.\2"),
    (_L + r"conv\.net2\.1\.gamma", r"layers.\1.conv.chan_norm_gamma"),
    (_L + r"conv\.net2\.2\.(weight|bias)", r"layers.\1.conv.pointwise_out.\2"),
    # ... upstream soundstorm-speechtokenizer / soundstorm-pytorch keep one nn.Sequential
    (_L + r"conv\.net\.0\.(weight|bias)", r"layers.\1.conv.norm.\2"),
    (_L + r"conv\.net\.2\.(weight|bias)", r"layers.\1.conv.pointwise_in.\2"),
    (_L + r"conv\.net\.4\.conv\.(weight|bias)", r"layers.\1.conv.depthwise.\2"),
    (_L + r"conv\.net\.6\.gamma", r"layers.\1.conv.chan_norm_gamma"),
    (_L + r"conv\.net\.7\.(weight|bias)", r"layers.\1.conv.pointwise_out.\2"),
    (_L + r"post_norm\.(weight|bias)", r"layers.\1.post_norm.\2"),
]]


_DERIVED_BUFFER = re.compile(r"(^|\.)(rotary_emb\.inv_freq|quantizer_offsets|mask_tokens)\Z")


def _unwrap_checkpoint(raw: Any, source: str) -> dict[str, Tensor]:
    """Accept a bare state dict or the usual wrappers ({'model': ...}, DDP's 'module.' prefix)."""
    if not isinstance(raw, Mapping):
        raise SoundStormLoadError(f"{source}: expected a state dict, got {type(raw).__name__}")
    for key in ("model", "state_dict", "module"):
        inner = raw.get(key)
        if isinstance(inner, Mapping) and inner and all(isinstance(v, Tensor) for v in inner.values()):
            raw = inner
            break
    state = {str(k): v for k, v in raw.items() if isinstance(v, Tensor)}
    if not state:
        raise SoundStormLoadError(f"{source}: holds no tensors")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def release_to_state_dict(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename release keys to ours; unknown keys pass through (and are then reported as unexpected)."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if _DERIVED_BUFFER.search(key):
            continue  # recomputed at run time; persistent in some older soundstorm-pytorch versions
        new = key
        for pattern, template in _RELEASE_RULES:
            match = pattern.match(key)
            if match:
                new = match.expand(template)
                break
        if new == "head_bias" and value.ndim == 4:
            value = value.reshape(value.shape[-2], value.shape[-1])  # EinMix stores it as [1, 1, q, c]
        if new in out:
            raise SoundStormLoadError(f"release state dict has both conv layouts for {new}")
        out[new] = value
    return out


def _infer_release_config(state: Mapping[str, Tensor], heads: int, source: str,
                          card: Mapping[str, Any] | None = None) -> SoundStormConfig:
    """Sizes from tensor shapes; the number of conditioning codebooks (and the provenance fields) from
    ``card`` when given, else one (the release conditions on SpeechTokenizer's layer 1)."""
    n_sem = int(card["lm_codebooks"]) if card is not None else 1
    try:
        dim = state["code_emb.weight"].shape[1]
        num_acoustic = state["head_proj.weight"].shape[0] // dim
        codebook = state["head_weight"].shape[-1]
        depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("layers."))
        inner_attn = state["layers.0.attn.to_q.weight"].shape[0]
        conv_inner, _, kernel = state["layers.0.conv.depthwise.weight"].shape
        ff_inner = state["layers.0.ff1.up.weight"].shape[0]
        semantic_vocab = state["semantic_emb.weight"].shape[0]
    except (KeyError, ValueError, IndexError) as exc:
        present = ", ".join(sorted(state)[:3])
        raise SoundStormLoadError(
            f"{source}: not a SoundStorm release state dict (cannot find {exc}; keys start {present})") from exc
    if inner_attn % heads:
        raise SoundStormLoadError(f"{source}: attention width {inner_attn} is not divisible by heads={heads}")
    provenance: dict[str, Any] = {}
    if card is not None:
        provenance = dict(frame_rate=None if card.get("frame_rate") is None else float(card["frame_rate"]),
                          codec=card.get("name"), modality=card.get("modality"))
    return SoundStormConfig(
        codebook_size=int(codebook), num_quantizers=int(num_acoustic) + n_sem,
        semantic_vocab_size=int(semantic_vocab) // n_sem, semantic_codebooks=n_sem,
        dim=int(dim), depth=int(depth), heads=heads, dim_head=int(inner_attn) // heads,
        ff_mult=int(ff_inner) // int(dim), conv_expansion=int(conv_inner) // int(dim), conv_kernel_size=int(kernel),
        **provenance,
    )


__all__ = [
    "DEFAULT_STEPS",
    "SIZES",
    "acoustic_modality",
    "SoundStorm",
    "SoundStormConfig",
    "SoundStormLoadError",
    "release_to_state_dict",
]
