"""The codec contract and registry, with a test double (the real codecs have their own tests)."""
from pathlib import Path

import numpy as np
import pytest

from anygpt.modalities import Codec, CodecError, build_codec, codec_class, load_codecs, register_codec


@register_codec("testdouble")
class DoubleCodec(Codec):
    """Codes are the waveform's sign pattern at 50 Hz: deterministic and input-dependent."""

    sample_rate, frame_rate, num_codebooks, codebook_size = 16000, 50.0, 2, 2

    def encode(self, items):
        return [np.stack([(np.asarray(w)[::320] > 0).astype(np.int64)] * 2) for w in items]

    def decode(self, codes):
        return [np.repeat(c[0].astype(np.float32) * 2 - 1, 320) for c in codes]

    @classmethod
    def tiny(cls, **kw):
        return cls()

    @classmethod
    def from_dir(cls, directory: Path, **kw):
        if not (directory / "card.yaml").is_file():
            raise CodecError(f"{directory}: card.yaml missing")
        return cls()

    def save(self, directory):
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "card.yaml").write_text("name: testdouble\n")


def test_contract_round_trip(tmp_path):
    codec = build_codec("testdouble", "tiny")
    wav = np.sin(np.linspace(0, 40, 16000)).astype(np.float32)
    (codes,) = codec.encode([wav])
    assert codes.shape == (2, 50) and codes.dtype == np.int64
    (back,) = codec.decode([codes])
    assert len(back) == len(wav)
    codec.save(tmp_path / "tdc")
    assert isinstance(build_codec("testdouble", tmp_path / "tdc"), DoubleCodec)
    assert codec_class("testdouble") is DoubleCodec


def test_registry_errors(tmp_path):
    with pytest.raises(CodecError, match="unknown modality 'video'"):
        build_codec("video", "tiny")
    with pytest.raises(CodecError, match="card.yaml missing"):
        build_codec("testdouble", tmp_path)
    with pytest.raises(CodecError, match="no 'testdouble/' codec directory"):
        load_codecs(tmp_path, modalities=("testdouble",))
