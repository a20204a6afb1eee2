"""Speech codec: SpeechTokenizer (Zhang et al., 2023, arXiv 2308.16692), 16 kHz, 8 RVQ layers x 1024, 50 Hz.

Why the architecture is implemented here instead of imported from the PyPI ``speechtokenizer``
package: that package's ``__init__`` imports its trainer, which imports ``torchaudio``; torchaudio's
last release is built against an older torch and, once installed, breaks ``import transformers``
(PLATFORM.md).  The inference model is small (SEANet encoder/decoder with LSTMs + an RVQ), so we
write it against plain torch with *exactly* the parameter/buffer names of the official checkpoint
(``encoder.model.N.conv.conv.weight_g`` ...), which lets ``load_state_dict(strict=True)`` accept the
released ``SpeechTokenizer.pt`` / AnyGPT ``ckpt.dev`` unchanged.  Only inference is implemented (no
EMA codebook updates, no HuBERT distillation); ``anygpt.modalities.fit`` seeds codebooks for tiny
codecs.

Layout facts carried over from the official model:
- encoder: conv(k7) -> per stride r in reversed(strides): resblock + act + conv(k=2r, stride r),
  channels doubling -> (bi)LSTM with skip -> act -> conv(k7) to ``dimension``;
- decoder: mirror image with transposed convs and a unidirectional LSTM;
- weight norm stored as ``weight_g``/``weight_v`` (old ``torch.nn.utils.weight_norm``, dim 0);
- RVQ: ``quantizer.vq.layers.i._codebook.{inited,cluster_size,embed,embed_avg}``; layer 1 is the
  semantic (HuBERT-distilled) one; ``transform`` maps its output to 768 d for distillation.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from anygpt.modalities.base import AudioCodec, CodecError
from anygpt.modalities.cards import card_label, check_codec_matches, dir_card, load_weights, named_card, resolve_files, write_card

WEIGHTS_NAME = "SpeechTokenizer.pt"
CONFIG_NAME = "config.json"

# The official base config (config/spt_base_cfg.json, model part).
OFFICIAL_CONFIG: dict[str, Any] = {
    "n_filters": 64,
    "strides": [8, 5, 4, 2],
    "dimension": 1024,
    "semantic_dimension": 768,
    "bidirectional": True,
    "dilation_base": 2,
    "residual_kernel_size": 3,
    "n_residual_layers": 1,
    "lstm_layers": 2,
    "activation": "ELU",
    "codebook_size": 1024,
    "n_q": 8,
    "sample_rate": 16000,
}

# Same code path, small widths.  Strides stay 8*5*4*2 (50 Hz at 16 kHz) and the RVQ stays 8 x 1024
# because the LM vocabulary layout depends on both.
TINY_CONFIG: dict[str, Any] = {
    **OFFICIAL_CONFIG,
    "n_filters": 8,
    "dimension": 64,
    "semantic_dimension": 32,
    "lstm_layers": 1,
}


# ------------------------------------------------------------------------------ building blocks


class _WeightNormConv(nn.Module):
    """A (transposed) 1-D convolution with weight normalisation stored as ``weight_g``/``weight_v``.

    The official checkpoints were written by the legacy ``torch.nn.utils.weight_norm`` (norm over
    every dim except 0), whose parameter names differ from today's parametrizations; computing
    ``w = g * v / ||v||`` ourselves keeps the released key names and avoids deprecated APIs.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, stride: int = 1, dilation: int = 1,
                 transposed: bool = False) -> None:
        super().__init__()
        self.transposed = transposed
        self.stride = stride
        self.dilation = dilation
        self.kernel_size = kernel_size
        shape = (in_ch, out_ch, kernel_size) if transposed else (out_ch, in_ch, kernel_size)
        v = torch.empty(shape)
        # Same init family as nn.Conv1d (kaiming-uniform, a=sqrt(5)).
        nn.init.kaiming_uniform_(v, a=math.sqrt(5))
        fan_in = (out_ch if transposed else in_ch) * kernel_size
        bound = 1.0 / math.sqrt(fan_in)
        # Registration order bias, weight_g, weight_v reproduces the official state-dict order.
        self.bias = nn.Parameter(torch.empty(out_ch).uniform_(-bound, bound))
        self.weight_g = nn.Parameter(v.flatten(1).norm(dim=1).view(-1, 1, 1).clone())
        self.weight_v = nn.Parameter(v)

    def weight(self) -> torch.Tensor:
        v = self.weight_v
        return v * (self.weight_g / v.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.transposed:
            return F.conv_transpose1d(x, self.weight(), self.bias, stride=self.stride)
        return F.conv1d(x, self.weight(), self.bias, stride=self.stride, dilation=self.dilation)


class _NormConv(nn.Module):
    """Holder that reproduces the official nesting (``<layer>.conv.conv.*`` / ``.convtr.convtr.*``)."""

    def __init__(self, inner: _WeightNormConv, attr: str) -> None:
        super().__init__()
        setattr(self, attr, inner)
        self.norm = nn.Identity()  # the official wrapper's (parameter-free) norm slot
        self._attr = attr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(getattr(self, self._attr)(x))


def _pad1d(x: torch.Tensor, left: int, right: int, mode: str) -> torch.Tensor:
    """Reflect padding that also works when the input is shorter than the pad (zero-extend first)."""
    if mode != "reflect":
        return F.pad(x, (left, right), mode=mode)
    length = x.shape[-1]
    extra = max(left, right) - length + 1 if length <= max(left, right) else 0
    if extra:
        x = F.pad(x, (0, extra))
    out = F.pad(x, (left, right), mode="reflect")
    return out[..., : out.shape[-1] - extra] if extra else out


class SConv1d(nn.Module):
    """Non-causal conv with "same"-style asymmetric padding so the last window is always full.

    Output length is ``ceil(T / stride)``, which makes the encoder produce ``ceil(L / hop)`` frames.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, stride: int = 1, dilation: int = 1,
                 pad_mode: str = "reflect") -> None:
        super().__init__()
        self.conv = _NormConv(_WeightNormConv(in_ch, out_ch, kernel_size, stride, dilation), "conv")
        self.pad_mode = pad_mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inner = self.conv.conv
        k, s, d = inner.kernel_size, inner.stride, inner.dilation
        padding_total = (k - 1) * d - (s - 1)
        length = x.shape[-1]
        n_frames = (length - k + padding_total) / s + 1
        ideal = (math.ceil(n_frames) - 1) * s + (k - padding_total)
        extra = ideal - length
        right = padding_total // 2
        left = padding_total - right
        return self.conv(_pad1d(x, left, right + extra, self.pad_mode))


class SConvTranspose1d(nn.Module):
    """Transposed conv that trims its fixed padding so ``T`` frames become ``T * stride`` samples."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, stride: int = 1) -> None:
        super().__init__()
        self.convtr = _NormConv(_WeightNormConv(in_ch, out_ch, kernel_size, stride, transposed=True), "convtr")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inner = self.convtr.convtr
        y = self.convtr(x)
        padding_total = inner.kernel_size - inner.stride
        right = padding_total // 2
        left = padding_total - right
        return y[..., left: y.shape[-1] - right]


class Snake1d(nn.Module):
    """Snake activation ``x + sin^2(a x) / a`` (the speechtokenizer_snake checkpoint uses it)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + (self.alpha + 1e-9).reciprocal() * torch.sin(self.alpha * x).pow(2)


def _activation(name: str, channels: int) -> nn.Module:
    if name == "Snake":
        return Snake1d(channels)
    if name == "ELU":
        return nn.ELU(alpha=1.0)
    if hasattr(nn, name):
        return getattr(nn, name)()
    raise CodecError(f"SpeechTokenizer config: unknown activation {name!r}")


class SEANetResnetBlock(nn.Module):
    """Residual unit: act -> conv(k, dilation) -> act -> conv(1), plus a 1x1 conv shortcut."""

    def __init__(self, dim: int, kernel_size: int, dilation: int, activation: str, compress: int = 2) -> None:
        super().__init__()
        hidden = dim // compress
        self.block = nn.Sequential(
            _activation(activation, dim),
            SConv1d(dim, hidden, kernel_size, dilation=dilation),
            _activation(activation, hidden),
            SConv1d(hidden, dim, 1),
        )
        self.shortcut = SConv1d(dim, dim, 1)  # official default true_skip=False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x) + self.block(x)


class SLSTM(nn.Module):
    """LSTM over the time axis of a ``[B, C, T]`` tensor with a skip connection.

    For the bidirectional encoder LSTM the skip input is repeated to 2C channels, as in the
    official model (the next conv then reads 2C channels).
    """

    def __init__(self, dim: int, num_layers: int, bidirectional: bool) -> None:
        super().__init__()
        self.bidirectional = bidirectional
        self.lstm = nn.LSTM(dim, dim, num_layers, bidirectional=bidirectional)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(2, 0, 1)
        y, _ = self.lstm(x)
        if self.bidirectional:
            x = x.repeat(1, 1, 2)
        return (y + x).permute(1, 2, 0)


class SEANetEncoder(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        nf, act = cfg["n_filters"], cfg.get("activation", "ELU")
        layers: list[nn.Module] = [SConv1d(1, nf, 7)]
        mult = 1
        for ratio in reversed(cfg["strides"]):
            for j in range(cfg["n_residual_layers"]):
                layers.append(SEANetResnetBlock(mult * nf, cfg["residual_kernel_size"], cfg["dilation_base"] ** j, act))
            layers += [_activation(act, mult * nf), SConv1d(mult * nf, mult * nf * 2, ratio * 2, stride=ratio)]
            mult *= 2
        if cfg["lstm_layers"]:
            layers.append(SLSTM(mult * nf, cfg["lstm_layers"], cfg["bidirectional"]))
        if cfg["bidirectional"]:
            mult *= 2
        layers += [_activation(act, mult * nf), SConv1d(mult * nf, cfg["dimension"], 7)]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class SEANetDecoder(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        nf, act = cfg["n_filters"], cfg.get("activation", "ELU")
        mult = 2 ** len(cfg["strides"])
        layers: list[nn.Module] = [SConv1d(cfg["dimension"], mult * nf, 7)]
        if cfg["lstm_layers"]:
            layers.append(SLSTM(mult * nf, cfg["lstm_layers"], bidirectional=False))
        for ratio in cfg["strides"]:
            layers += [_activation(act, mult * nf), SConvTranspose1d(mult * nf, mult * nf // 2, ratio * 2, stride=ratio)]
            for j in range(cfg["n_residual_layers"]):
                layers.append(SEANetResnetBlock(mult * nf // 2, cfg["residual_kernel_size"], cfg["dilation_base"] ** j, act))
            mult //= 2
        layers += [_activation(act, nf), SConv1d(nf, 1, 7)]
        self.model = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.model(z)


class EuclideanCodebook(nn.Module):
    """One RVQ codebook (inference part): nearest ``embed`` row by squared L2 distance.

    ``inited``/``cluster_size``/``embed_avg`` are the official EMA-training buffers, kept so the
    checkpoint loads strictly and so ``fit`` can record what it did.  Like the official model with
    ``kmeans_init=True``, a fresh codebook is all zeros (every code 0) until seeded from data.
    """

    def __init__(self, dim: int, codebook_size: int) -> None:
        super().__init__()
        self.codebook_size = codebook_size
        self.register_buffer("inited", torch.zeros(1))
        self.register_buffer("cluster_size", torch.zeros(codebook_size))
        self.register_buffer("embed", torch.zeros(codebook_size, dim))
        self.register_buffer("embed_avg", torch.zeros(codebook_size, dim))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., D]`` -> ids ``[...]`` (distances in float32: fp16 ties would flip codes)."""
        flat = x.reshape(-1, x.shape[-1]).float()
        embed = self.embed.float()
        dist = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ embed.t() + embed.pow(2).sum(1)[None]
        return dist.argmin(dim=-1).view(x.shape[:-1])

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.embed)

    @torch.no_grad()
    def set_codebook(self, centroids: torch.Tensor, counts: torch.Tensor | None = None) -> None:
        self.embed.copy_(centroids.to(self.embed))
        self.embed_avg.copy_(centroids.to(self.embed_avg))
        if counts is not None:
            self.cluster_size.copy_(counts.to(self.cluster_size))
        self.inited.fill_(1.0)


class VectorQuantization(nn.Module):
    def __init__(self, dim: int, codebook_size: int) -> None:
        super().__init__()
        self._codebook = EuclideanCodebook(dim, codebook_size)

    def encode(self, x: torch.Tensor) -> torch.Tensor:  # x [B, D, T] -> [B, T]
        return self._codebook.encode(x.transpose(1, 2))

    def decode(self, ids: torch.Tensor) -> torch.Tensor:  # [B, T] -> [B, D, T]
        return self._codebook.decode(ids).transpose(1, 2)


class ResidualVectorQuantization(nn.Module):
    def __init__(self, dim: int, codebook_size: int, n_q: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([VectorQuantization(dim, codebook_size) for _ in range(n_q)])


class ResidualVectorQuantizer(nn.Module):
    """RVQ with the official nesting (``quantizer.vq.layers.i``)."""

    def __init__(self, dim: int, n_q: int, bins: int) -> None:
        super().__init__()
        self.n_q = n_q
        self.dimension = dim
        self.bins = bins
        self.vq = ResidualVectorQuantization(dim, bins, n_q)

    def encode(self, x: torch.Tensor, n_q: int | None = None, st: int = 0) -> torch.Tensor:
        """``x [B, D, T]`` -> codes ``[n_q - st, B, T]`` (each layer quantises the previous residual)."""
        n_q = n_q or self.n_q
        residual = x.float()
        codes = []
        for layer in self.vq.layers[st:n_q]:
            ids = layer.encode(residual)
            residual = residual - layer.decode(ids).float()
            codes.append(ids)
        return torch.stack(codes)

    def decode(self, codes: torch.Tensor, st: int = 0) -> torch.Tensor:
        """codes ``[K, B, T]`` for layers ``st .. st+K-1`` -> summed embedding ``[B, D, T]``."""
        if st + codes.shape[0] > self.n_q:
            raise CodecError(f"SpeechTokenizer: {codes.shape[0]} layers from layer {st} exceed n_q={self.n_q}")
        out = None
        for i, ids in enumerate(codes):
            q = self.vq.layers[st + i].decode(ids)
            out = q if out is None else out + q
        return out


# ------------------------------------------------------------------------------ the codec


def _read_config(path: Path, card: dict[str, Any]) -> dict[str, Any]:
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CodecError(f"{card_label(card)}: cannot read {path} ({' '.join(str(exc).split())})") from None
    missing = [k for k in ("n_filters", "strides", "dimension", "codebook_size", "n_q") if k not in cfg]
    if missing:
        raise CodecError(f"{card_label(card)}: {path} is not a SpeechTokenizer config (missing {missing})")
    return {**OFFICIAL_CONFIG, **cfg}


def _load_state_dict(path: Path, card: dict[str, Any]) -> dict[str, torch.Tensor]:
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CodecError(f"{card_label(card)}: cannot load {path} ({' '.join(str(exc).split())[:200]})") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise CodecError(f"{card_label(card)}: {path} does not hold a state dict")
    return sd


def _config_facts(cfg: dict[str, Any]) -> dict[str, Any]:
    """What a config implies for the card's fields (checked before building anything)."""
    sr = int(cfg["sample_rate"])
    return {"sample_rate": sr, "frame_rate": sr / int(np.prod(cfg["strides"])),
            "num_codebooks": int(cfg["n_q"]), "codebook_size": int(cfg["codebook_size"])}


class SpeechTokenizerCodec(AudioCodec):
    """SpeechTokenizer as a codec.  Its own ``state_dict()`` *is* the official checkpoint layout.

    ``encode(wavs)`` -> one ``[8, T]`` int64 array per 16 kHz waveform (T = ceil(samples / 320));
    row 0 is the semantic layer the LM sees, rows 1-7 are the acoustic layers the SoundStorm-style
    decoder predicts.  ``decode`` renders ``T * 320`` samples from any number of leading layers.
    """

    card_name = "speechtokenizer"

    def __init__(self, config: dict[str, Any] | None = None, card: dict[str, Any] | None = None,
                 pad_batches: bool = False, use_half: bool = False) -> None:
        super().__init__()
        cfg = {**OFFICIAL_CONFIG, **(config or {})}
        self.config = cfg
        self.card = card if card is not None else named_card(self.card_name)
        self.sample_rate = int(cfg["sample_rate"])
        self.hop_length = int(np.prod(cfg["strides"]))
        self.frame_rate = self.sample_rate / self.hop_length
        self.num_codebooks = int(cfg["n_q"])
        self.codebook_size = int(cfg["codebook_size"])
        self.pad_batches = pad_batches
        self.use_half = use_half  # fp16 autocast for the conv/LSTM stacks on CUDA only
        # Official attribute names -> official state-dict keys.
        self.encoder = SEANetEncoder(cfg)
        if cfg["dimension"] != cfg["semantic_dimension"]:
            self.transform: nn.Module = nn.Linear(cfg["dimension"], cfg["semantic_dimension"])
        else:
            self.transform = nn.Identity()
        self.quantizer = ResidualVectorQuantizer(cfg["dimension"], self.num_codebooks, self.codebook_size)
        self.decoder = SEANetDecoder(cfg)
        self.eval()

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def tiny(cls, *, seed: int | None = 0, **kwargs: Any) -> "SpeechTokenizerCodec":
        """Small random SpeechTokenizer (same code path): 16 kHz, 50 Hz, 8 x 1024 codes."""
        overrides = kwargs.pop("config", {}) or {}
        device = kwargs.pop("device", None)
        return cls._tiny_from(lambda: cls({**TINY_CONFIG, **overrides}, **kwargs), seed, device)

    @classmethod
    def official(cls, **kwargs: Any) -> "SpeechTokenizerCodec":
        """The released architecture (103.7 M parameters), randomly initialised."""
        device = kwargs.pop("device", None)
        codec = cls(dict(OFFICIAL_CONFIG), **kwargs)
        return codec.to(device) if device is not None else codec

    @classmethod
    def from_dir(cls, directory: Path | str, card: dict[str, Any] | None = None, **kwargs: Any) -> "SpeechTokenizerCodec":
        """Load ``config.json`` + weights (``SpeechTokenizer.pt`` / ``ckpt.dev`` / ``*.pt``); every
        parameter must be there (unused extra keys are reported and ignored)."""
        directory = Path(directory)
        card = card or dir_card(directory) or named_card(cls.card_name)
        files = resolve_files(card, directory)
        cfg = _read_config(files["config"], card)
        check_codec_matches(card, **_config_facts(cfg))
        sd = _load_state_dict(files["weights"], card)
        device = kwargs.pop("device", None)
        with torch.device("meta"):  # weights come from the checkpoint: skip random init
            codec = cls(cfg, card=card, **kwargs)
        load_weights(codec, sd, card, files["weights"], assign=True)
        if device is not None:
            codec.to(device)
        return codec

    def save(self, directory: str | os.PathLike, **card_updates: Any) -> None:
        """Write ``config.json`` + ``SpeechTokenizer.pt`` (official layout) + ``card.yaml``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_NAME).write_text(json.dumps(self.config, indent=2), encoding="utf-8")
        torch.save({k: v.detach().cpu() for k, v in self.state_dict().items()}, directory / WEIGHTS_NAME)
        write_card(self.card, directory, **card_updates)

    # ---- model-level API (tensors) -----------------------------------------------------------

    @torch.inference_mode()
    def encode_tensor(self, wav: torch.Tensor, n_q: int | None = None, st: int = 0) -> torch.Tensor:
        """``wav [B, 1, L]`` (or ``[B, L]``) at 16 kHz -> codes ``[n_q, B, ceil(L/320)]`` (official order)."""
        if wav.dim() == 2:
            wav = wav.unsqueeze(1)
        wav = wav.to(self.device, torch.float32)
        with self._autocast():
            emb = self.encoder(wav)
        return self.quantizer.encode(emb.float(), n_q=n_q, st=st)

    @torch.inference_mode()
    def embeddings(self, wav: torch.Tensor) -> torch.Tensor:
        """Continuous encoder output ``[B, D, T]`` (what the RVQ quantises; used by ``fit``)."""
        if wav.dim() == 2:
            wav = wav.unsqueeze(1)
        with self._autocast():
            return self.encoder(wav.to(self.device, torch.float32)).float()

    @torch.inference_mode()
    def decode_tensor(self, codes: torch.Tensor, st: int = 0) -> torch.Tensor:
        """codes ``[K, B, T]`` (layers ``st..st+K-1``) -> waveform ``[B, 1, T*320]``."""
        codes = codes.to(self.device, torch.long)
        self._check_range(codes)
        quantized = self.quantizer.decode(codes, st=st)
        with self._autocast():
            return self.decoder(quantized).float()

    @torch.inference_mode()
    def decode_layers(self, semantic: torch.Tensor, acoustic: torch.Tensor | None = None) -> torch.Tensor:
        """Decode layer-1 ids ``[B, T]`` plus acoustic layers ``[K<=7, B, T]`` (e.g. from the
        SoundStorm decoder) -> ``[B, 1, T*320]``.  Without ``acoustic`` only the semantic layer is used."""
        semantic = torch.as_tensor(semantic)
        if semantic.dim() == 1:
            semantic = semantic[None]
        codes = semantic[None]
        if acoustic is not None:
            acoustic = torch.as_tensor(acoustic)
            if acoustic.dim() == 2:
                acoustic = acoustic[:, None]
            if acoustic.shape[1:] != semantic.shape:
                raise CodecError(f"decode_layers: acoustic {tuple(acoustic.shape)} does not match semantic "
                                 f"{tuple(semantic.shape)} (expected [K, B, T])")
            codes = torch.cat([codes, acoustic.to(semantic)], dim=0)
        return self.decode_tensor(codes)

    @torch.inference_mode()
    def semantic_features(self, wav: torch.Tensor) -> torch.Tensor:
        """Layer-1 quantised features through ``transform`` -> ``[B, T, semantic_dimension]``
        (the space that was distilled from HuBERT)."""
        codes = self.encode_tensor(wav, n_q=1)
        q = self.quantizer.decode(codes)
        return self.transform(q.transpose(1, 2))

    # ---- codec contract (lists of numpy arrays) -------------------------------------------

    def encode_batch(self, wav: torch.Tensor) -> torch.Tensor:
        """``[B, 1, L]`` -> ``[B, 8, T]`` (the contract's batch-first order)."""
        return self.encode_tensor(wav).transpose(0, 1)

    def decode_batch(self, codes: torch.Tensor) -> torch.Tensor:
        """``[B, K, T]`` (K leading RVQ layers) -> ``[B, 1, T*320]``."""
        return self.decode_tensor(codes.transpose(0, 1))

    # ---- fitting hooks (used by anygpt.modalities.fit) ---------------------------------------

    def codebooks(self) -> list[EuclideanCodebook]:
        return [layer._codebook for layer in self.quantizer.vq.layers]


__all__ = ["SpeechTokenizerCodec", "OFFICIAL_CONFIG", "TINY_CONFIG", "WEIGHTS_NAME"]
