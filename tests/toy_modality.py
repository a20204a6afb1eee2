"""A toy modality defined outside the package: what adding a modality takes (this module + one card).

"toy" media are 1-D sensor traces sampled at 100 Hz, stored as ``.npy`` files.  The codec averages
10 samples into one frame (10 frames per second) and quantises each frame to the nearest of 16
levels (one codebook of 16 ids); ``anygpt codec fit`` moves the levels to the data by k-means.
Register it with ``ANYGPT_PLUGINS=tests/toy_modality.py`` (this file's path).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from anygpt.modalities import register_modality
from anygpt.modalities.base import Codec
from anygpt.modalities.cards import dir_card, load_weights, named_card, resolve_files, write_card
from anygpt.modalities.media import MediaError, source_name
from anygpt.modalities.plugin import Modality, ReadOptions

RATE, HOP, LEVELS = 100, 10, 16


@register_modality
class Toy(Modality):
    name = "toy"
    start, end, prefix = "<soty>", "<eoty>", "🧪"
    default_codec = "toy_scalar"
    card_dir = Path(__file__).parent / "assets" / "cards"
    nouns = ("signal", "trace")
    x2text_openers = ("Describe {the} {noun}.", "What does {the} {noun} do?")
    text2x_openers = ("Generate {a} {noun} from this description.", "Make {a} {noun} like this.")
    sampling = {"temperature": 1.0, "top_p": 1.0, "max_tokens": 64}
    suffixes = (".npy",)
    output_suffix = ".npy"

    def read(self, src: Any, codec: Any, options: ReadOptions = ReadOptions()) -> tuple[Any, dict]:
        try:
            trace = np.load(src, allow_pickle=False).astype(np.float32).reshape(-1)
        except Exception as e:
            raise MediaError(f"{source_name(src)}: not a .npy trace ({type(e).__name__})") from None
        if trace.size < HOP or not np.isfinite(trace).all():
            raise MediaError(f"{source_name(src)}: a trace needs at least {HOP} finite samples")
        return trace, {"seconds": trace.size / RATE, "sample_rate": RATE}

    def write(self, path: str | os.PathLike, item: Any, codec: Any) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, np.asarray(item, dtype=np.float32))
        return path

    def seconds(self, item: Any, codec: Any) -> float:
        return len(item) / RATE


class ToyScalarCodec(Codec):
    card_name = "toy_scalar"
    sample_rate, frame_rate, num_codebooks, codebook_size = RATE, RATE / HOP, 1, LEVELS

    def __init__(self, card: dict | None = None) -> None:
        super().__init__()
        self.card = card if card is not None else named_card(self.card_name, [Toy.card_dir])
        self.levels = torch.nn.Embedding(LEVELS, 1)
        with torch.no_grad():
            self.levels.weight.copy_(torch.linspace(-1, 1, LEVELS)[:, None])

    @classmethod
    def tiny(cls, card: dict | None = None, **kwargs: Any) -> "ToyScalarCodec":
        return cls(card)

    @classmethod
    def from_dir(cls, directory: Path, card: dict | None = None, **kwargs: Any) -> "ToyScalarCodec":
        card = card or dir_card(directory) or named_card(cls.card_name, [Toy.card_dir])
        files = resolve_files(card, directory)
        codec = cls(card)
        load_weights(codec, torch.load(files["weights"], weights_only=True), card, files["weights"])
        return codec

    def save(self, directory: str | Path, **card_updates: Any) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        torch.save(self.state_dict(), Path(directory) / "levels.pt")
        write_card(self.card, directory, **card_updates)

    def _frames(self, item: Any) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(item, dtype=np.float32)).reshape(-1)
        return x[: len(x) // HOP * HOP].reshape(-1, HOP).mean(1, keepdim=True)

    def encode(self, items: Sequence[Any]) -> list[np.ndarray]:
        out = []
        for item in items:
            d = (self._frames(item) - self.levels.weight[:, 0][None]).abs()
            out.append(d.argmin(1).numpy().astype(np.int64)[None])
        return out

    def decode(self, codes: Sequence[np.ndarray], **options: Any) -> list[np.ndarray]:
        with torch.no_grad():
            return [np.repeat(self.levels.weight[torch.as_tensor(np.asarray(c)[0]), 0].numpy(), HOP) for c in codes]

    def fit_vectors(self, items: Sequence[Any]) -> torch.Tensor:
        return torch.cat([self._frames(item) for item in items])

    def codebooks(self) -> list[Any]:
        return [self.levels]
