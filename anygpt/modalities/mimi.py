"""Speech codec: Mimi (Défossez et al., 2024, the codec of Moshi, arXiv 2410.00037) via ``transformers.MimiModel``.

Mono 24 kHz audio -> ``[8, T]`` codes of 2048 at 12.5 frames/s (``T = ceil(samples / 1920)``): a
causal SEANet encoder (hop 960, 25 Hz) + an 8-layer transformer, a stride-2 downsample to 12.5 Hz,
and a *split* RVQ.  Codebook 1 is a semantic RVQ of its own (distilled from WavLM during training; the
role of SpeechTokenizer's layer 1: the LM sees it, 12.5 ids per second instead of 50); codebooks 2..K
come from an acoustic RVQ that is fed the same latent (not the semantic residual), each RVQ through
its own 1x1 input projection.  The decoder sums both RVQs' outputs, so any number of leading codebooks
(1..K) renders audio of ``T * 1920`` samples.

``transformers`` already implements the architecture and reads the ``kyutai/mimi`` checkpoint (its
flat key layout is renamed on load), so we wrap it, like Encodec.  What this module adds:

- the card's ``num_codebooks`` (8 by default, what Moshi uses) out of the released 32;
- strict loading: missing or mis-shaped weights are errors, and unused keys are reported.  Mimi's
  ``from_pretrained`` silently drops unexpected keys under ``encoder.``/``decoder.``/``quantizer.``
  (``_keys_to_ignore_on_load_unexpected`` of its halves), so unused keys are found by comparing the
  checkpoint's key names with the model's own, in both layouts;
- fitting (``anygpt codec fit``): transformers' ``MimiEuclideanCodebook`` has no ``embed`` buffer --
  ``embed`` is ``embed_sum / cluster_usage``, computed once and cached in ``_embed`` -- so the codebook
  handles below write ``embed_sum``/``cluster_usage`` and drop the cache; the split quantiser is
  fitted as two residual chains (:meth:`MimiCodec.fit_chains`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from anygpt.modalities.base import CodecError, TransformersAudioCodec
from anygpt.modalities.cards import card_label, named_card
from anygpt.modalities.media import coerce_audio

# kyutai/mimi config.json (model part).  Written out rather than taken from MimiConfig's defaults so a
# transformers release that moves a default cannot change the architecture we benchmark.
OFFICIAL_CONFIG: dict[str, Any] = {
    "sampling_rate": 24000,
    "audio_channels": 1,
    "hidden_size": 512,
    "num_filters": 64,
    "num_residual_layers": 1,
    "upsampling_ratios": [8, 6, 5, 4],
    "kernel_size": 7,
    "last_kernel_size": 3,
    "residual_kernel_size": 3,
    "dilation_growth_rate": 2,
    "use_causal_conv": True,
    "pad_mode": "constant",
    "compress": 2,
    "trim_right_ratio": 1.0,
    "codebook_size": 2048,
    "codebook_dim": 256,
    "num_quantizers": 32,
    "use_conv_shortcut": False,
    "vector_quantization_hidden_dimension": 256,
    "num_semantic_quantizers": 1,
    "upsample_groups": 512,
    "num_hidden_layers": 8,
    "intermediate_size": 2048,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "hidden_act": "gelu",
    "max_position_embeddings": 8000,
    "norm_eps": 1e-5,
    "sliding_window": 250,
    "layer_scale_initial_scale": 0.01,
    "attention_bias": False,
}

# Same code path, small widths.  Sample rate, hop (1920 -> 12.5 Hz) and the 2048-entry codebooks stay
# because the vocabulary layout and the frame rate depend on them; 8 quantizers = the card's
# num_codebooks.  upsample_groups must divide hidden_size (the released 512 = hidden_size).
TINY_CONFIG: dict[str, Any] = {
    **OFFICIAL_CONFIG,
    "hidden_size": 64,
    "num_filters": 8,
    "codebook_dim": 32,
    "vector_quantization_hidden_dimension": 32,
    "num_quantizers": 8,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "head_dim": 16,
    "intermediate_size": 128,
    "upsample_groups": 64,
}


class MimiCodebook:
    """``anygpt codec fit``'s handle on one ``MimiEuclideanCodebook``.

    Its centroids are ``embed_sum / cluster_usage`` (EMA statistics), cached in ``_embed`` at first
    use: writing ``embed`` would change only the cache (lost on save, and stale after any reload), so
    :meth:`set_codebook` writes the statistics and drops the cache.
    """

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module

    @property
    def embed(self) -> torch.Tensor:
        return self.module.embed

    @torch.no_grad()
    def set_codebook(self, centroids: torch.Tensor, counts: torch.Tensor) -> None:
        m = self.module
        usage = counts.to(m.cluster_usage).clamp_min(1.0)  # unused rows keep their centroid exactly
        m.cluster_usage.copy_(usage)
        m.embed_sum.copy_(centroids.to(m.embed_sum) * usage[:, None])
        m.initialized.fill_(1.0)
        m._embed = None


def _drop_codebook_caches(model: torch.nn.Module) -> None:
    for m in model.modules():
        if hasattr(m, "embed_sum") and hasattr(m, "_embed"):
            m._embed = None


class MimiCodec(TransformersAudioCodec):
    """Mimi as a codec: 1-D 24 kHz waveforms <-> ``[K, T]`` code arrays (K = the card's ``num_codebooks``,
    T = ``ceil(len / 1920)``); row 0 is the semantic codebook the LM sees, rows 1..K-1 the acoustic
    ones the SoundStorm-style decoder predicts.

    Args:
        model: a ``transformers.MimiModel`` (mono, ``kyutai/mimi`` family).
        card: the codec's card (default: ``tokenizers/mimi.yaml``).
        pad_batches: encode the whole batch in one zero-padded pass (faster, on GPUs above all).  By
            default every item is encoded in a pass of its own, so its codes are exactly the ones it
            gets alone: Mimi's CPU kernels differ by ~1e-6 (relative) between batch sizes, which flips
            near-tie codes of the deep acoustic codebooks (fitted tiny codec: 8-24 of 104 codes per
            1 s clip, equal lengths); SpeechTokenizer and Encodec were batch-invariant in the same check.
        use_half: run encoder/decoder under fp16 autocast on CUDA (RVQ distances stay float32).
    """

    card_name = "mimi"
    model_class, config_class = "MimiModel", "MimiConfig"
    official_config = OFFICIAL_CONFIG  # kyutai/mimi: 79.3 M parameters + 16.8 M codebook buffers
    tiny_config = TINY_CONFIG  # 24 kHz, 12.5 Hz, 8 x 2048 codes, 0.6 M parameters
    # Mismatched shapes are reported (and refused by from_dir) instead of raising inside transformers.
    load_options = {"ignore_mismatched_sizes": True, "dtype": torch.float32}

    def __init__(self, model: Any, card: dict[str, Any] | None = None, pad_batches: bool = False,
                 use_half: bool = False) -> None:
        super().__init__()
        cfg = model.config
        self.card = card if card is not None else named_card(self.card_name)
        if cfg.audio_channels != 1:
            raise CodecError(f"{card_label(self.card)}: expected a mono Mimi (audio_channels=1), got {cfg.audio_channels}")
        self.model = model
        self.sample_rate = int(cfg.sampling_rate)
        self.hop_length = int(cfg.frame_size)  # 1920: every conv gives ceil(L / stride) frames
        self.frame_rate = self.sample_rate / self.hop_length
        self.num_codebooks = int(self.card["num_codebooks"])
        self.num_semantic = int(cfg.num_semantic_quantizers)
        if not self.num_semantic <= self.num_codebooks <= int(cfg.num_quantizers):
            raise CodecError(f"{card_label(self.card)}: num_codebooks {self.num_codebooks} must lie between the "
                             f"config's num_semantic_quantizers {self.num_semantic} and num_quantizers "
                             f"{cfg.num_quantizers}")
        self.codebook_size = int(cfg.codebook_size)
        self.pad_batches = pad_batches
        self.use_half = use_half
        self.eval()

    @classmethod
    def unused_keys(cls, model: Any, info: dict[str, Any], weights: Path) -> list[str]:
        return _unused_keys(model, weights)  # from_pretrained's own list misses most (module docstring)

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> "MimiCodec":
        # ``.to(device/dtype)`` moves buffers, not the codebooks' cached ``_embed``: recompute it.
        out = super()._apply(fn, *args, **kwargs)
        _drop_codebook_caches(self.model)
        return out

    # ---- tensors --------------------------------------------------------------------------------

    @torch.no_grad()
    def latents(self, wav: torch.Tensor) -> torch.Tensor:
        """Encoder output ``[B, hidden_size, ceil(L/1920)]`` for ``wav [B, 1, L]`` (what both RVQs read)."""
        if wav.dim() == 2:
            wav = wav.unsqueeze(1)
        with self._autocast():
            return self.model.encoder(wav.to(self.device, torch.float32)).latents.float()

    @torch.inference_mode()
    def encode_tensor(self, wav: torch.Tensor) -> torch.Tensor:
        """``wav [B, 1, L]`` at 24 kHz -> codes ``[B, K, ceil(L/1920)]``."""
        codes = self.model.quantizer.encode(self.latents(wav), self.num_codebooks)  # [K, B, T]
        return codes.transpose(0, 1)

    @torch.inference_mode()
    def decode_tensor(self, codes: torch.Tensor) -> torch.Tensor:
        """codes ``[B, K, T]`` (K leading codebooks, 1..num_codebooks) -> waveform ``[B, 1, T*1920]``."""
        codes = codes.to(self.device, torch.long)
        self._check_range(codes)
        with self._autocast():
            return self.model.decode(codes).audio_values.float()

    # ---- codec contract (AudioCodec's encode/decode around these) ------------------------------

    encode_batch = encode_tensor
    decode_batch = decode_tensor

    def passes(self, lengths: Sequence[int]) -> list[list[int]]:
        """One padded pass with ``pad_batches``, else one pass per item (see the class docstring)."""
        return super().passes(lengths) if self.pad_batches else [[i] for i in range(len(lengths))]

    # ---- fitting hooks ----------------------------------------------------------------------------

    def _rvqs(self) -> list[tuple[Any, int]]:
        """(residual quantiser, codebooks of it in use), in the order of the codebook axis."""
        q = self.model.quantizer
        chains = [(q.semantic_residual_vector_quantizer, self.num_semantic)]
        if self.num_codebooks > self.num_semantic:
            chains.append((q.acoustic_residual_vector_quantizer, self.num_codebooks - self.num_semantic))
        return chains

    def fit_chains(self, items: Sequence[Any]) -> list[tuple[torch.Tensor, list[MimiCodebook]]]:
        """Per RVQ, its projected latent frames ``[N, codebook_dim]`` and its codebooks in use: the semantic
        codebook, then the acoustic ones (fitted in turn on the residuals of the acoustic chain)."""
        frames = []
        for i, item in enumerate(items):
            wav = torch.from_numpy(coerce_audio(item, self.sample_rate, f"speech item {i}"))[None, None]
            frames.append(self.latents(wav)[..., : self.num_frames(wav.shape[-1])])
        latents = torch.cat(frames, dim=-1)  # [1, hidden, N]
        out = []
        with torch.no_grad():
            for rvq, n in self._rvqs():
                x = rvq.input_proj(latents) if rvq.input_proj is not None else latents
                out.append((x[0].t().float().cpu(), [MimiCodebook(layer.codebook) for layer in rvq.layers[:n]]))
        return out

    def fit_vectors(self, items: Sequence[Any]) -> torch.Tensor:
        """What the first (semantic) codebook quantises: projected latent frames ``[N, codebook_dim]``."""
        return self.fit_chains(items)[0][0]

    def codebooks(self) -> list[MimiCodebook]:
        """The codebooks in use, in the order of the codes' rows (semantic first)."""
        return [MimiCodebook(layer.codebook) for rvq, n in self._rvqs() for layer in rvq.layers[:n]]


def _unused_keys(model: Any, weights: Path) -> list[str]:
    """Checkpoint keys the model has under neither layout (its own names, or the flat kyutai/mimi
    names ``save_pretrained`` writes).  ``from_pretrained``'s own list misses most of them (see the
    module docstring)."""
    from safetensors import safe_open
    from transformers.core_model_loading import revert_weight_conversion

    with safe_open(str(weights), framework="pt") as f:
        stored = list(f.keys())
    own = model.state_dict()
    known = set(own) | set(revert_weight_conversion(model, own))
    return sorted(k for k in stored if k not in known)


__all__ = ["MimiCodec", "MimiCodebook", "OFFICIAL_CONFIG", "TINY_CONFIG"]
