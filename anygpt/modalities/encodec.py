"""Music codec: Encodec 32 kHz (the MusicGen tokenizer, ``facebook/encodec_32khz``) via ``transformers``.

Mono 32 kHz audio -> 4 codebooks x 2048 at 50 frames/s (2.2 kbps).  ``transformers.EncodecModel``
already implements this architecture and reads the Hugging Face checkpoint layout (including the
legacy ``weight_g``/``weight_v`` weight-norm keys), so we wrap it rather than re-implement it.

Why we call ``model.encoder`` + ``model.quantizer`` ourselves instead of ``model.encode``: the
32 kHz model has no chunking of its own (``chunk_length_s`` is null), so a 10-minute track would be
one giant forward pass; we split long inputs into hop-aligned chunks (frame counts add up exactly),
keep the RVQ distance computation in float32 while the conv stacks may run in fp16 on CUDA, and
get at the encoder output that ``fit`` needs.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from anygpt.modalities.base import CodecError, TransformersAudioCodec
from anygpt.modalities.cards import named_card

# facebook/encodec_32khz config.json (model part).
OFFICIAL_CONFIG: dict[str, Any] = {
    "audio_channels": 1,
    "chunk_length_s": None,
    "overlap": None,
    "codebook_dim": 128,
    "codebook_size": 2048,
    "compress": 2,
    "dilation_growth_rate": 2,
    "hidden_size": 128,
    "kernel_size": 7,
    "last_kernel_size": 7,
    "norm_type": "weight_norm",
    "normalize": False,
    "num_filters": 64,
    "num_lstm_layers": 2,
    "num_residual_layers": 1,
    "pad_mode": "reflect",
    "residual_kernel_size": 3,
    "sampling_rate": 32000,
    "target_bandwidths": [2.2],
    "trim_right_ratio": 1.0,
    "upsampling_ratios": [8, 5, 4, 4],
    "use_causal_conv": False,
    "use_conv_shortcut": False,
}

# Same family, small widths; sample rate, hop (640 -> 50 Hz), 4 x 2048 codebooks unchanged because
# the vocabulary layout depends on them.
TINY_CONFIG: dict[str, Any] = {**OFFICIAL_CONFIG, "num_filters": 8, "hidden_size": 32, "codebook_dim": 32,
                               "num_lstm_layers": 1}


class EncodecMusicCodec(TransformersAudioCodec):
    """Encodec 32 kHz as a codec: 1-D 32 kHz waveforms <-> ``[4, T]`` code arrays (T = ceil(len/640)).

    Args:
        model: a ``transformers.EncodecModel`` in the encodec_32khz layout.
        chunk_seconds: inputs longer than this are encoded/decoded chunk by chunk (bounded memory).
        pad_batches: batch items of different lengths in one padded pass (faster; codes at the
            padded end of shorter items may differ slightly from an unpadded pass).
        use_half: run the conv/LSTM stacks under fp16 autocast on CUDA.
    """

    card_name = "encodec_32khz"
    model_class, config_class = "EncodecModel", "EncodecConfig"
    official_config = OFFICIAL_CONFIG  # facebook/encodec_32khz: 56.9 M parameters
    tiny_config = TINY_CONFIG  # 32 kHz, 50 Hz, 4 x 2048 codes
    checked_facts = ("sample_rate", "frame_rate", "num_codebooks", "codebook_size")
    decodes_prefixes = False  # the 32 kHz model's decoder wants all 4 codebooks

    def __init__(self, model: Any, card: dict[str, Any] | None = None, chunk_seconds: float = 20.0,
                 pad_batches: bool = False, use_half: bool = False) -> None:
        super().__init__()
        cfg = model.config
        if cfg.normalize:
            raise CodecError("music codec: this Encodec config has normalize=true (24/48 kHz style, per-chunk "
                             "scales); expected the facebook/encodec_32khz layout")
        if cfg.audio_channels != 1:
            raise CodecError(f"music codec: expected a mono Encodec (audio_channels=1), got {cfg.audio_channels}")
        self.model = model
        self.card = card if card is not None else named_card(self.card_name)
        self.sample_rate = int(cfg.sampling_rate)
        self.hop_length = int(np.prod(cfg.upsampling_ratios))
        self.frame_rate = self.sample_rate / self.hop_length
        self.bandwidth = float(cfg.target_bandwidths[0])
        self.num_codebooks = int(model.quantizer.get_num_quantizers_for_bandwidth(self.bandwidth))
        self.codebook_size = int(cfg.codebook_size)
        # Chunks hold a whole number of frames so per-chunk frame counts add up to ceil(L / hop).
        self.chunk_samples = max(1, int(chunk_seconds * self.frame_rate)) * self.hop_length
        self.pad_batches = pad_batches
        self.use_half = use_half
        self.eval()

    # ---- tensors --------------------------------------------------------------------------------

    @torch.inference_mode()
    def embeddings(self, wav: torch.Tensor) -> torch.Tensor:
        """Encoder output ``[B, D, T]`` for ``wav [B, 1, L]`` (chunked; what the RVQ quantises)."""
        if wav.dim() == 2:
            wav = wav.unsqueeze(1)
        wav = wav.to(self.device, torch.float32)
        outs = []
        for start in range(0, wav.shape[-1], self.chunk_samples):
            with self._autocast():
                outs.append(self.model.encoder(wav[..., start: start + self.chunk_samples]).float())
        return torch.cat(outs, dim=-1)

    @torch.inference_mode()
    def encode_tensor(self, wav: torch.Tensor) -> torch.Tensor:
        """``wav [B, 1, L]`` at 32 kHz -> codes ``[B, 4, ceil(L/640)]``."""
        emb = self.embeddings(wav)
        codes = self.model.quantizer.encode(emb, self.bandwidth)  # [K, B, T], float32 distances
        return codes.transpose(0, 1)

    @torch.inference_mode()
    def decode_tensor(self, codes: torch.Tensor) -> torch.Tensor:
        """codes ``[B, K, T]`` -> waveform ``[B, 1, T*640]`` (decoded chunk by chunk)."""
        codes = codes.to(self.device, torch.long)
        self._check_range(codes)
        step = self.chunk_samples // self.hop_length
        outs = []
        for start in range(0, codes.shape[-1], step):
            emb = self.model.quantizer.decode(codes[..., start: start + step].transpose(0, 1))
            with self._autocast():
                outs.append(self.model.decoder(emb).float())
        return torch.cat(outs, dim=-1)

    # The contract's batch methods are the tensor methods themselves (already batch-first).
    encode_batch = encode_tensor
    decode_batch = decode_tensor

    # ---- fitting hooks ----------------------------------------------------------------------------

    def codebooks(self) -> list[Any]:
        """The RVQ codebooks in use (``EncodecEuclideanCodebook``: ``embed``/``embed_avg``/... buffers)."""
        return [layer.codebook for layer in self.model.quantizer.layers[: self.num_codebooks]]


__all__ = ["EncodecMusicCodec", "OFFICIAL_CONFIG", "TINY_CONFIG"]
