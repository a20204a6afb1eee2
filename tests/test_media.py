"""Media I/O: soundfile + soxr audio, Pillow images, and one clear error type for bad input."""
from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from anygpt.modalities.media import (
    CLIP_MEAN,
    CLIP_STD,
    MediaError,
    as_waveform,
    group_by_length,
    image_to_tensor,
    load_audio,
    load_image,
    resample,
    save_audio,
)


def _sine(freq: float, sr: int, seconds: float, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _peak_hz(wav: np.ndarray, sr: int) -> float:
    spec = np.abs(np.fft.rfft(wav * np.hanning(len(wav))))
    return float(np.fft.rfftfreq(len(wav), 1 / sr)[spec.argmax()])


# ------------------------------------------------------------------------------------- audio ---


def test_stereo_44k_wav_becomes_mono_16k(tmp_path):
    left, right = _sine(1000, 44100, 1.0), _sine(1000, 44100, 1.0, amp=0.1)
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([left, right], 1), 44100)
    wav, info = load_audio(path, 16000)
    assert wav.dtype == np.float32 and wav.ndim == 1
    assert abs(len(wav) - 16000) <= 1
    assert info.orig_sample_rate == 44100 and info.orig_channels == 2 and not info.truncated
    assert abs(_peak_hz(wav, 16000) - 1000) < 5  # a real resampler keeps the tone where it was
    assert abs(np.abs(wav[2000:-2000]).max() - 0.3) < 0.02  # channel average of 0.5 and 0.1


def test_resampler_removes_content_above_new_nyquist():
    # 7 kHz + 11 kHz at 48 kHz -> 16 kHz: the 11 kHz part must be filtered, not aliased to 5 kHz.
    x = _sine(7000, 48000, 1.0, 0.3) + _sine(11000, 48000, 1.0, 0.3)
    y = resample(x, 48000, 16000)
    spec = np.abs(np.fft.rfft(y * np.hanning(len(y))))
    freqs = np.fft.rfftfreq(len(y), 1 / 16000)
    alias = spec[np.abs(freqs - 5000) < 50].max()
    tone = spec[np.abs(freqs - 7000) < 50].max()
    assert alias < tone * 1e-2


def test_flac_and_odd_channel_count(tmp_path):
    three = np.stack([_sine(300, 16000, 0.5), np.zeros(8000, np.float32), _sine(300, 16000, 0.5)], 1)
    path = tmp_path / "three.flac"
    sf.write(path, three, 16000)
    wav, info = load_audio(path, 16000)
    assert info.orig_channels == 3 and len(wav) == 8000
    np.testing.assert_allclose(wav, three.mean(1), atol=1e-4)  # FLAC is 16-bit


def test_clip_reports_truncation(tmp_path):
    path = tmp_path / "long.wav"
    sf.write(path, _sine(440, 16000, 3.0), 16000)
    wav, info = load_audio(path, 16000, max_seconds=1.25)
    assert len(wav) == 20000 and info.truncated and info.seconds == pytest.approx(1.25)
    assert info.orig_seconds == pytest.approx(3.0)
    wav, info = load_audio(path, 8000, max_seconds=10)
    assert not info.truncated and len(wav) == 24000


@pytest.mark.parametrize("case", ["missing", "empty", "garbage", "zero_length", "nan"])
def test_bad_audio_raises_media_error_naming_file(tmp_path, case):
    path = tmp_path / f"{case}.wav"
    if case == "empty":
        path.write_bytes(b"")
    elif case == "garbage":
        path.write_bytes(b"this is not audio at all" * 10)
    elif case == "zero_length":
        sf.write(path, np.zeros((0, 1), np.float32), 16000)
    elif case == "nan":
        sf.write(path, np.full(100, np.nan, np.float32), 16000, subtype="FLOAT")
    with pytest.raises(MediaError) as err:
        load_audio(path, 16000)
    msg = str(err.value)
    assert str(path) in msg and "\n" not in msg


def test_save_audio_round_trip(tmp_path):
    x = _sine(220, 16000, 0.5)
    out = save_audio(tmp_path / "sub" / "x.wav", x, 16000)
    y, info = load_audio(out, 16000)
    assert info.orig_sample_rate == 16000 and np.abs(y - x).max() < 1e-3


def test_as_waveform_accepts_arrays_and_tensors():
    import torch

    assert as_waveform(torch.ones(2, 100)).shape == (100,)
    assert as_waveform(np.ones(50)).dtype == np.float32
    with pytest.raises(MediaError, match="zero-length"):
        as_waveform(np.zeros(0))
    with pytest.raises(MediaError, match="expected"):
        as_waveform(np.zeros((2, 2, 2)))


def test_group_by_length():
    assert group_by_length([5, 3, 5, 3, 7], pad=False) == [[0, 2], [1, 3], [4]]
    assert group_by_length([5, 3], pad=True) == [[0, 1]]


# ------------------------------------------------------------------------------------- images ---


def test_rgba_is_composited_on_white(tmp_path):
    arr = np.zeros((8, 8, 4), np.uint8)
    arr[..., 0] = 255
    arr[:4, :, 3] = 255  # top half opaque red, bottom half transparent
    Image.fromarray(arr, "RGBA").save(tmp_path / "a.png")
    img = load_image(tmp_path / "a.png")
    assert img.mode == "RGB"
    assert img.getpixel((0, 0)) == (255, 0, 0) and img.getpixel((0, 7)) == (255, 255, 255)


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (10, 20, 30))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    img.save(tmp_path / "o.jpg", exif=exif.tobytes())
    out = load_image(tmp_path / "o.jpg")
    assert out.size == (20, 40)


@pytest.mark.parametrize("mode", ["L", "P", "I;16", "CMYK", "1"])
def test_other_modes_become_rgb(tmp_path, mode):
    if mode == "I;16":
        img = Image.fromarray((np.arange(64).reshape(8, 8) * 1000).astype(np.uint16))
        ext = "png"
    else:
        img = Image.new("RGB", (8, 8), (200, 100, 50)).convert(mode)
        ext = "jpg" if mode == "CMYK" else "png"
    path = tmp_path / f"m.{ext}"
    img.save(path)
    out = load_image(path)
    assert out.mode == "RGB" and out.size == (8, 8)
    if mode == "I;16":  # 16-bit values are rescaled, not clipped to white
        assert out.getpixel((0, 0))[0] == 0 and out.getpixel((7, 7))[0] == 255


@pytest.mark.parametrize("case", ["missing", "empty", "not_image", "truncated"])
def test_bad_image_raises_media_error_naming_file(tmp_path, case):
    path = tmp_path / f"{case}.png"
    if case == "empty":
        path.write_bytes(b"")
    elif case == "not_image":
        path.write_text("hello")
    elif case == "truncated":
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    with pytest.raises(MediaError) as err:
        load_image(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_image_to_tensor_is_clip_normalised_224():
    white = Image.new("RGB", (300, 120), (255, 255, 255))
    x = image_to_tensor([white, white.convert("L")])
    assert tuple(x.shape) == (2, 3, 224, 224)
    want = (1 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    np.testing.assert_allclose(x[0, :, 100, 100].numpy(), want, rtol=1e-5)
    np.testing.assert_allclose(x[1].numpy(), x[0].numpy(), rtol=1e-5)
