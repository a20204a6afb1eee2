"""Base-model tasks: ``anygpt generate --model DIR "in|out|content[|voice.wav]"`` (anygpt.infer.tasks)."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from anygpt.formats import Media, pretrain_pair
from anygpt.infer.tasks import Task, TaskError, parse_task, task_conversation

pytest.importorskip("anygpt.modalities.image", reason="image codec module not available")
pytest.importorskip("anygpt.decoders.soundstorm", reason="SoundStorm decoder not available")
pytest.importorskip("anygpt.decoders.unclip", reason="unCLIP renderer not available")


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    """A tiny export with codecs/ and soundstorm/ inside, as the default lookup expects."""
    from anygpt.decoders.soundstorm import SoundStorm, SoundStormConfig
    from anygpt.infer.testing import build_tiny_model_dir
    from anygpt.modalities import build_codec

    root = tmp_path_factory.mktemp("tasks")
    model_dir = build_tiny_model_dir(root)
    for m in ("speech", "music", "image"):
        build_codec(m, "tiny").save(model_dir / "codecs" / m)
    torch.manual_seed(0)
    SoundStorm(SoundStormConfig.tiny()).save_pretrained(model_dir / "soundstorm")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield model_dir
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def media_files(tmp_path_factory):
    from PIL import Image

    from anygpt.modalities.media import save_audio

    d = tmp_path_factory.mktemp("media")
    t = np.arange(16000 * 2) / 16000
    save_audio(d / "clip.wav", (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 16000)
    save_audio(d / "voice.flac", (0.3 * np.sin(2 * np.pi * 140 * t)).astype(np.float32), 16000)
    t = np.arange(44100) / 44100  # another rate: resampled on the way in
    save_audio(d / "song.wav", (0.3 * np.sin(2 * np.pi * 330 * t)).astype(np.float32), 44100)
    Image.new("RGB", (80, 60), (200, 30, 30)).save(d / "red.png")
    return d


def test_parse_task_forms():
    assert parse_task("text|image|a red bus") == Task("text", "image", "a red bus")
    assert parse_task("speech|text|x.wav") == Task("speech", "text", "x.wav")
    assert parse_task("text|speech|hello|v.wav") == Task("text", "speech", "hello", "v.wav")
    assert parse_task("text|speech|hello") == Task("text", "speech", "hello")
    assert parse_task("text|music|a|b").content == "a|b"  # '|' in a caption survives
    for bad, msg in [("text|image", "expected in|out|content"), ("text|text|hi", "exactly one side"),
                     ("image|music|x.png", "exactly one side"), ("text|video|x", "unknown output"),
                     ("text|image|  ", "content is empty")]:
        with pytest.raises(TaskError, match=msg):
            parse_task(bad)


@pytest.mark.parametrize("modality", ["image", "speech", "music"])
def test_task_prompt_is_the_training_prefix(modality, export_dir):
    """The prompt is token for token the start of a rendered stage-1 pair (one template)."""
    from anygpt.formats import SequenceFormat
    from anygpt.layout import VocabLayout
    from anygpt.text_tokenizer import load_tokenizer

    fmt = SequenceFormat(load_tokenizer(export_dir), VocabLayout.load(export_dir))
    m = fmt.layout.modality(modality)
    codes = np.random.default_rng(0).integers(0, m.codebook_size, (m.num_codebooks, m.span_length or 6))
    media = Media(modality, codes)
    for direction, task in (("text2x", Task("text", modality, "a red bus")), ("x2text", Task(modality, "text", "f"))):
        instr = "Do it."
        full = fmt.render(pretrain_pair(modality, media, "a red bus", direction, random.Random(0), instr)).ids
        prompt = fmt.prompt(task_conversation(task, media, instr))
        assert full[: len(prompt)].tolist() == prompt.tolist()


def test_generate_every_direction_writes_readable_files(export_dir, media_files, tmp_path, capsys):
    import soundfile as sf
    from PIL import Image

    from anygpt.infer.cli import main

    out = tmp_path / "out"
    tasks = ["text|image|a red bus", f"image|text|{media_files / 'red.png'}",
             f"text|speech|hello there|{media_files / 'voice.flac'}", f"speech|text|{media_files / 'clip.wav'}",
             "text|music|calm piano", f"music|text|{media_files / 'song.wav'}", "text|speech|no voice given"]
    rc = main(["--model", str(export_dir), "--out", str(out), "--seed", "0", "--max-new-tokens", "120",
               "--set", "speech.max_tokens=60", "--set", "music.max_tokens=80", "--image-steps", "2",
               "--json", str(tmp_path / "r.json"), *tasks], command="generate")
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "speech decoder: " + str(export_dir / "soundstorm") in printed  # found inside the export
    results = json.loads((tmp_path / "r.json").read_text())
    assert [r["task"] for r in results] == tasks and not any(r["error"] for r in results)
    for r in results:
        assert r["issues"] == [] and r["stop"] == "eom"
        for f in r["files"] + ([r["text_file"]] if r["text_file"] else []):
            assert f in printed and f.startswith(str(out))
    img = Image.open(results[0]["files"][0])
    img.load()
    assert img.size[0] > 0
    for r, rate in ((results[2], 16000), (results[4], 32000), (results[6], 16000)):
        data, sr = sf.read(r["files"][0])
        assert sr == rate and len(data) > 0 and np.isfinite(data).all()
    for r in (results[1], results[3], results[5]):
        assert (out / r["text_file"].split("/")[-1]).read_text(encoding="utf-8").strip() == r["text"]


def test_generate_reports_bad_inputs_and_keeps_going(export_dir, media_files, tmp_path, capsys):
    from anygpt.infer.cli import main

    (tmp_path / "notes.txt").write_text("not an image")
    tasks = [f"image|text|{tmp_path / 'missing.png'}", f"speech|text|{media_files / 'red.png'}",
             f"image|text|{tmp_path / 'notes.txt'}", "text|image|still works"]
    rc = main(["--model", str(export_dir), "--codecs", "tiny", "--soundstorm", "none", "--out", str(tmp_path / "o"),
               "--seed", "1", "--image-steps", "1", *tasks], command="generate")
    printed = capsys.readouterr().out
    assert rc == 1
    assert "missing.png: no such file" in printed
    assert "unsupported format for speech" in printed
    assert "notes.txt" in printed and "image" in printed
    assert len(list((tmp_path / "o").glob("*.png"))) == 1


def test_generate_fails_fast_on_bad_arguments(capsys, tmp_path):
    from anygpt.infer.cli import main

    assert main(["--model", str(tmp_path), "text|video|x"], command="generate") == 1
    assert "unknown output modality" in capsys.readouterr().err
    assert main(["--model", str(tmp_path), "--set", "speech.warmth=2", "text|image|x"], command="generate") == 1
    assert "unknown field" in capsys.readouterr().err
    assert main(["--model", str(tmp_path), "text|image|x"], command="generate") == 1
    assert "not a model directory" in capsys.readouterr().err
