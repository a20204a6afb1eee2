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


def test_parse_task_knows_the_models_modalities():
    from anygpt.layout import VocabLayout

    layout = VocabLayout.default(320, ["speech"])
    assert parse_task("text|speech|hi|v.wav", layout) == Task("text", "speech", "hi", "v.wav")
    with pytest.raises(TaskError, match="unknown output modality 'image'; use one of text, speech$"):
        parse_task("text|image|a red bus", layout)


def test_image_speech_model_without_music(tmp_path, media_files):
    """A layout with image and speech only: their tasks run, a music task fails with one line, and the
    chat answers /music with one line."""
    import io

    from anygpt.infer.chat import ChatSession, TerminalChat
    from anygpt.infer.loading import load_lm
    from anygpt.infer.mediaio import MediaIO
    from anygpt.infer.settings import GenerationConfig
    from anygpt.infer.tasks import run_tasks
    from anygpt.infer.testing import build_tiny_model_dir

    lm = load_lm(build_tiny_model_dir(tmp_path / "m", modalities=["image", "speech"]), device="cpu")
    assert list(lm.layout.modalities) == ["image", "speech"] and "music" in lm.layout.missing()
    media = MediaIO(lm.layout, "tiny", None, render_options={"image": {"steps": 1}}, seed=0)
    out = io.StringIO()
    tasks = ["text|music|calm piano", "text|image|a red bus", f"speech|text|{media_files / 'clip.wav'}"]
    results = run_tasks(lm, media, tasks, GenerationConfig(max_new_tokens=40, seed=0), tmp_path / "o", out=out,
                        stream=False)
    assert results[0].error == "text|music|calm piano: this model has no music modality (it has: image, speech)"
    assert out.getvalue().count("no music modality") == 1
    assert results[1].error is None and results[1].files[0].path.suffix == ".png"
    assert results[2].error is None and results[2].text_file.is_file()
    chat_out = io.StringIO()
    session = ChatSession(lm, media, GenerationConfig(max_new_tokens=20, seed=0), tmp_path / "c")
    chat = TerminalChat(session, out=chat_out)
    chat.handle(f"/music {media_files / 'song.wav'}")
    chat.handle(f"/image {media_files / 'red.png'} what is it?")
    assert chat_out.getvalue().splitlines()[0] == "error: this model has no music modality (it has: image, speech)"
    assert "(attached image" in chat_out.getvalue() and len(session.history) == 2


def test_codecs_dir_of_another_codec_is_refused(export_dir, tmp_path, capsys):
    """A codecs directory whose card is not the codec the model was trained with: one line naming both."""
    import shutil

    from anygpt.infer.cli import main

    codecs = tmp_path / "codecs"
    shutil.copytree(export_dir / "codecs" / "speech", codecs / "speech")
    card = codecs / "speech" / "card.yaml"
    card.write_text(card.read_text().replace("name: speechtokenizer", "name: mimi")
                    .replace("codebook_size: 1024", "codebook_size: 2048"))
    rc = main(["--model", str(export_dir), "--codecs", str(codecs), "--out", str(tmp_path / "o"),
               "text|speech|hello"], command="generate")
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1
    assert "speechtokenizer" in err[0] and "mimi" in err[0] and "2048" in err[0]


TOY_SCRIPT = r'''
import io, json, sys
from pathlib import Path
import numpy as np
from anygpt import modalities as registry
from anygpt.formats import instruction_pool
from anygpt.infer.chat import commands
from anygpt.infer.cli import main
from anygpt.infer.loading import load_lm
from anygpt.infer.mediaio import MediaIO, MediaInputError
from anygpt.infer.settings import GenerationConfig, default_settings, mode_names
from anygpt.infer.tasks import run_tasks
from anygpt.infer.testing import build_tiny_model_dir, excite_specials

root = Path(sys.argv[1])
assert registry.names()[-1] == "toy" and mode_names()[-1] == "toy"
assert instruction_pool("toy", "text2x") == ("Generate a signal from this description.",
    "Generate a trace from this description.", "Make a signal like this.", "Make a trace like this.")
assert default_settings()["toy"].max_tokens == 64
d = build_tiny_model_dir(root / "m")
lm = load_lm(d, device="cpu")
toy = lm.layout.modality("toy")
assert "/toy" in commands(lm.layout)
results = []
real = lm.generator.generate


def keep(*a, **k):  # the answers' ids, which the task results do not carry
    got = real(*a, **k)
    results.extend(got)
    return got


lm.generator.generate = keep
media = MediaIO(lm.layout, "tiny", None, seed=0)
# Excited marker rows make spans likely (and often end them at once): take the first excitation whose
# span holds more than one frame, so the length check below means something.
for seed in range(12):
    excite_specials(lm.model, lm.layout, seed)
    out = io.StringIO()
    res = run_tasks(lm, media, ["text|toy|a rising signal"], GenerationConfig(max_new_tokens=80, seed=0),
                    root / "o", out=out, stream=False)[0]
    assert res.error is None and res.issues == [] and res.stop == "eom", out.getvalue()
    ids = results[-1].ids.tolist()
    assert ids[0] == lm.layout.id("<soty>") and ids[-1] == lm.layout.id("<eoty>"), ids
    body = ids[1:-1]
    assert body and all(toy.offset <= t < toy.stop for t in body), ids
    if len(body) > 1:
        break
assert len(body) > 1, "no excitation gave a toy span longer than one frame"
lm.model.save_pretrained(str(d))  # the CLI below loads the same excited weights
trace = np.load(res.files[0].path)
assert res.files[0].path.suffix == ".npy" and trace.shape == (10 * len(body),), (trace.shape, len(body))
# The tiny toy codec's 16 levels are evenly spaced in [-1, 1]: the file holds exactly the span's codes.
levels = np.linspace(-1, 1, 16, dtype=np.float32)
assert np.allclose(trace, np.repeat(levels[np.asarray(body) - toy.offset], 10), atol=1e-6)
(root / "trace.npy").write_bytes(res.files[0].path.read_bytes())
try:
    media.encode_file("speech", root / "trace.npy")
    raise SystemExit("a .npy accepted as speech")
except MediaInputError as e:
    assert "(.npy is toy media; use /toy)" in str(e), e
rc = main(["--model", str(d), "--codecs", "tiny", "--out", str(root / "cli"), "--seed", "0",
           "--max-new-tokens", "80", "--json", str(root / "r.json"), "text|toy|a rising signal"], command="generate")
got = json.loads((root / "r.json").read_text())[0]
assert rc == 0 and got["error"] is None and got["issues"] == [], got
cli_trace = np.load(got["files"][0])
assert cli_trace.size > 0 and cli_trace.size % 10 == 0
print("toy ok", len(body), cli_trace.size)
'''


def test_toy_modality_end_to_end_at_inference(tmp_path):
    """The toy plugin (tests/toy_modality.py) through the task runner and ``anygpt generate``: one
    well-formed toy span (ids in the toy range, closed by <eoty>) rendered to a .npy of frames x 10."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "ANYGPT_PLUGINS": str(repo / "tests" / "toy_modality.py"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(repo), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", TOY_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "toy ok" in proc.stdout
