"""The chat (anygpt.infer.chat): bad input never ends a session, history stays within the context,
media answers become files, and the real entry point runs from stdin."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from anygpt.formats import Conversation, Media, Text, Turn
from anygpt.infer.chat import ChatSession, TerminalChat, run_chat, split_path_arg
from anygpt.infer.settings import GenerationConfig, default_settings

pytest.importorskip("anygpt.modalities.image", reason="image codec module not available")
pytest.importorskip("anygpt.decoders.soundstorm", reason="SoundStorm decoder not available")
pytest.importorskip("anygpt.decoders.unclip", reason="unCLIP renderer not available")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from anygpt.infer.testing import build_tiny_model_dir

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield build_tiny_model_dir(tmp_path_factory.mktemp("chat"))
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def lm(model_dir):
    from anygpt.infer.loading import load_lm

    return load_lm(model_dir, device="cpu")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from PIL import Image

    from anygpt.modalities.media import save_audio

    d = tmp_path_factory.mktemp("files")
    t = np.arange(16000) / 16000
    save_audio(d / "hello.wav", (0.3 * np.sin(2 * np.pi * 200 * t)).astype(np.float32), 16000)
    t = np.arange(16000 * 31) / 16000
    save_audio(d / "long speech.wav", (0.2 * np.sin(2 * np.pi * 150 * t)).astype(np.float32), 16000)
    Image.new("RGB", (40, 40), (20, 200, 20)).save(d / "green.png")
    (d / "notes.txt").write_text("plain text, not media")
    (d / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    return d


def _core(lm, tmp_path, config=None, **kw):
    from anygpt.infer.mediaio import MediaIO

    media = MediaIO(lm.layout, "tiny", "tiny", render_options={"image": {"steps": 1}}, seed=0)
    cfg = config or GenerationConfig(max_new_tokens=40, seed=0)
    return ChatSession(lm, media, cfg, tmp_path / "out", **kw)


def _session(lm, tmp_path, config=None, **kw):
    """The terminal chat over a session, printing into a buffer."""
    out = io.StringIO()
    return TerminalChat(_core(lm, tmp_path, config, **kw), out=out), out


def test_split_path_arg():
    assert split_path_arg('"my file.png" what is it') == ("my file.png", "what is it")
    assert split_path_arg("a.png  describe") == ("a.png", "describe")
    assert split_path_arg("") == ("", "")
    with pytest.raises(ValueError, match="unclosed quote"):
        split_path_arg('"a.png describe')


def test_session_survives_every_bad_input(lm, files, tmp_path):
    chat, out = _session(lm, tmp_path)
    script = tmp_path / "script.txt"
    lines = [
        "hello there",
        "",  # empty line
        "   ",
        f"/image {files / 'missing.png'}",  # missing file
        f"/speech {files / 'green.png'}",  # unsupported format (an image given as speech)
        f"/image {files / 'notes.txt'}",  # not an image at all
        f"/speech {files / 'notes.txt'}",  # not audio at all
        f"/music {files / 'broken.wav'}",  # truncated/corrupt audio
        f'/speech "{files / "long speech.wav"}" what did I say?',  # over-long audio: cut with a note
        f"/image {files}",  # a directory
        "/image",  # no path
        '/image "unclosed',  # bad quoting
        "/bogus command",  # unknown command
        "/send",  # nothing pending
        "/settings speech.temperature=oops",
        "/voice /nonexistent/voice.wav",
        f"/save {files / 'notes.txt' / 'x.json'}",  # cannot write there
        "/history",
        "and one more turn",
        "/history",
    ]
    script.write_text("\n".join(lines) + "\n", encoding="utf-8")  # then EOF
    assert run_chat(chat, script=str(script)) == 0
    text = out.getvalue()
    for expected in ["(empty line ignored", "missing.png: no such file", "unsupported format for speech",
                     "notes.txt: not a recognised image format", "notes.txt: cannot read audio",
                     "broken.wav", "31.0 s is longer than the 30 s limit for speech; using the first 30 s",
                     "is a directory", "/image needs a file path", "unclosed quote", "unknown command /bogus",
                     "nothing to send", "is not a valid float", "/nonexistent/voice.wav: no such file",
                     "cannot save", "(end of input)", "bye"]:
        assert expected in text, f"missing {expected!r} in:\n{text}"
    assert text.count("error: ") >= 12
    # Three real turns went through, errors left no trace in the history.
    assert len(chat.session.history) == 6 and [t.role for t in chat.session.history] == ["user", "assistant"] * 3
    speech_turn = chat.session.history[2]
    assert isinstance(speech_turn.parts[0], Media) and speech_turn.parts[0].codes.shape[1] == 30 * 50
    assert chat.pending == []


def test_ctrl_c_at_prompt_and_during_generation(lm, tmp_path, monkeypatch):
    chat, out = _session(lm, tmp_path)
    inputs = iter(["first turn", KeyboardInterrupt(), "second turn", "/history", EOFError()])

    def read_line(prompt):
        item = next(inputs)
        if isinstance(item, BaseException):
            raise item
        return item

    real = chat.session.lm.generator.generate_one
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(chat.session.lm.generator, "generate_one", flaky)
    assert run_chat(chat, read_line=read_line) == 0
    text = out.getvalue()
    assert "(Ctrl-C: type /quit or press Ctrl-D to leave)" in text
    assert "(interrupted: the turn was discarded)" in text
    assert len(chat.session.history) == 2 and chat.session.history[0].parts == [Text("first turn")]
    assert text.rstrip().endswith("bye")


def test_quit_ends_and_later_lines_are_ignored(lm, tmp_path):
    chat, out = _session(lm, tmp_path)
    script = tmp_path / "s.txt"
    script.write_text("/help\n/quit\nnever sent\n")
    assert run_chat(chat, script=str(script)) == 0
    assert "/voice PATH" in out.getvalue() and "never sent" not in out.getvalue().split("/quit")[-1]
    assert chat.session.history == []


def test_history_is_trimmed_to_the_context(lm, tmp_path):
    from anygpt.infer.loading import load_lm

    small = load_lm(lm.directory, device="cpu", context_length=160)
    cfg = GenerationConfig(max_new_tokens=30, seed=0)
    chat, out = _session(small, tmp_path, config=cfg)
    for i in range(8):
        chat.handle(f"turn number {i} with a few more words to fill the context")
        # What is kept always fits: history + the answer just given stayed within the context.
        assert len(small.generator.format.render(Conversation(chat.session.history)).ids) <= 160
    text = out.getvalue()
    assert "(context: dropped the oldest" in text
    assert chat.session.dropped_total > 0
    assert "turn number 7" in chat.session.describe_parts(chat.session.history[-2].parts)
    # One turn longer than the whole context: an error, the session goes on.
    chat.handle("word " * 400)
    assert "no room for an answer" in out.getvalue()
    chat.handle("/history")
    assert "earlier exchange(s) dropped" in out.getvalue()


@pytest.mark.parametrize("modality", ["speech", "image", "music"])
def test_media_answers_become_readable_files(lm, files, tmp_path, modality):
    import soundfile as sf
    from PIL import Image

    modes = {k: replace(v, max_tokens=min(v.max_tokens, 40)) for k, v in default_settings().items()}
    cfg = GenerationConfig(modes=modes, max_new_tokens=60, seed=0, outputs=(modality,), require=modality)
    chat, out = _session(lm, tmp_path, config=cfg)
    if modality == "speech":
        chat.handle(f"/voice {files / 'hello.wav'}")
        assert chat.session.voice is not None and chat.session.voice.shape[0] == 8
    chat.handle(f"/image {files / 'green.png'} answer with {modality}")
    text = out.getvalue()
    paths = [line.split(": ", 1)[1].split(" (")[0] for line in text.splitlines() if line.startswith(f"-> {modality}: ")]
    assert len(paths) == 1, text
    path = Path(paths[0])
    assert path.is_file() and path.parent == tmp_path / "out"
    if modality == "image":
        img = Image.open(path)
        img.load()
    else:
        data, sr = sf.read(path)
        assert sr == (16000 if modality == "speech" else 32000) and len(data) > 0
    saved = chat.session.save(tmp_path / "conv.json")
    record = json.loads(saved.read_text())
    roles = [t["role"] for t in record["conversation"]]
    assert roles == ["user", "assistant"]
    assert record["conversation"][0]["content"][0] == {"image": str((files / "green.png").resolve())}
    assert record["conversation"][1]["content"] == [{modality: str(path.resolve())}]


def test_chat_entry_point_reads_stdin(model_dir, files, tmp_path):
    """``python launch/chat.py --model DIR --script -`` with piped input, as scripts use it."""
    lines = "\n".join(["hi", "", f"/image {files / 'nope.png'}", f"/image {files / 'green.png'} what is it",
                       f"/save {tmp_path / 'c.json'}"]) + "\n"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "chat.py"), "--model", str(model_dir),
                           "--codecs", "tiny", "--out", str(tmp_path / "o"), "--max-new-tokens", "24",
                           "--seed", "0", "--script", "-"],
                          input=lines, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr == ""  # only our own lines (on stdout): no library warnings
    assert "nope.png: no such file" in proc.stdout
    assert "(attached image" in proc.stdout and proc.stdout.rstrip().endswith("bye")
    saved = json.loads((tmp_path / "c.json").read_text())
    assert len(saved["conversation"]) == 4


@pytest.mark.slow
def test_generate_prints_only_our_own_lines(model_dir, tmp_path):
    """``anygpt generate`` as a new user runs it: no transformers cache-API deprecation warning, no
    torchvision fallback note (image rendering included), nothing on stderr at all."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "default"}
    proc = subprocess.run([sys.executable, "-m", "anygpt.cli", "generate", "--model", str(model_dir), "--codecs", "tiny",
                           "--out", str(tmp_path), "--max-new-tokens", "40", "--seed", "0", "--image-steps", "1",
                           "text|image|a red bus", "text|speech|hello there"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for word in ("past_key_values", "torchvision", "deprecat", "Warning"):
        assert word not in proc.stderr and word not in proc.stdout, proc.stderr[-2000:]
    assert proc.stderr == ""
    assert "wrote image:" in proc.stdout and "wrote speech:" in proc.stdout


def test_unconstrained_malformed_answers_are_reported(model_dir, tmp_path):
    """With --unconstrained an erratic model writes broken spans: warnings, no crash, session goes on."""
    from anygpt.infer.loading import load_lm
    from anygpt.infer.testing import excite_specials

    lm = load_lm(model_dir, device="cpu")  # a private copy: its weights are about to be scrambled
    warned = 0
    for seed in range(6):
        excite_specials(lm.model, lm.layout, 600 + seed)
        cfg = GenerationConfig(max_new_tokens=40, seed=seed, constrained=False)
        chat, out = _session(lm, tmp_path, config=cfg)
        for line in ("first", "second", "/history"):
            assert chat.handle(line) is True
        text = out.getvalue()
        assert "error: unexpected" not in text  # nothing escaped as an internal error
        warned += text.count("warning: malformed output")
        assert len(chat.session.history) == 4
    assert warned > 0


def test_media_limits_and_options_come_from_the_plugins(lm):
    from anygpt.infer.mediaio import MediaIO

    media = MediaIO(lm.layout, "tiny", max_seconds={"music": 4.0})
    assert media.max_seconds == {"speech": 30.0, "music": 4.0, "voice": 10.0}
    assert MediaIO(lm.layout, None, render_options={"image": {"steps": "3", "seed": None}}).render_options == \
        {"image": {"steps": 3}}
    with pytest.raises(ValueError, match="image has no render option 'colour'; it has: steps, guidance, seed"):
        MediaIO(lm.layout, None, render_options={"image": {"colour": 1}})


def test_help_and_commands_follow_the_layout(lm):
    """Every modality of the layout has its /command (and help line); /voice comes with the voice modality."""
    from anygpt.infer.chat import commands, help_text

    names = list(lm.layout.modalities)
    assert commands(lm.layout)[: len(names) + 1] == (*(f"/{m}" for m in names), "/voice")
    text = help_text(lm.layout)
    for m in names:
        assert f"/{m} PATH [text]" in text
    assert "/voice PATH | off" in text and "/settings" in text


def test_speech_only_model_chats_and_refuses_other_modalities(tmp_path, files):
    """A SpeechGPT-style layout (speech only) loads, chats in text and with /speech, generates a
    well-formed speech span, and answers /image and /music with one line each."""
    import soundfile as sf

    from anygpt.infer.chat import commands, help_text
    from anygpt.infer.loading import load_lm
    from anygpt.infer.testing import build_tiny_model_dir, excite_specials

    lm = load_lm(build_tiny_model_dir(tmp_path / "m", modalities=["speech"]), device="cpu")
    layout = lm.layout
    assert list(layout.modalities) == ["speech"] and {"image", "music"} <= set(layout.missing())
    assert "/image" not in commands(layout) and "/speech" in commands(layout) and "/voice" in commands(layout)
    assert "/image" not in help_text(layout)
    chat, out = _session(lm, tmp_path)
    for line in ("hello", f"/speech {files / 'hello.wav'} what did I say?", f"/image {files / 'green.png'}",
                 f"/music {files / 'hello.wav'}", "/help"):
        assert chat.handle(line) is True
    text = out.getvalue()
    assert "error: this model has no image modality (it has: speech)" in text
    assert "error: this model has no music modality (it has: speech)" in text
    assert [t.role for t in chat.session.history] == ["user", "assistant"] * 2
    heard = chat.session.history[2].parts[0]
    assert isinstance(heard, Media) and heard.modality == "speech" and heard.codes.shape[1] == 50

    sp = layout.modality("speech")
    modes = {k: replace(v, max_tokens=min(v.max_tokens, 30)) for k, v in default_settings().items()}
    cfg = GenerationConfig(modes=modes, max_new_tokens=50, seed=0, outputs=("speech",), require="speech")
    prompt = lm.generator.format.prompt(Conversation(chat.session.history[:1]))
    for seed in range(3):
        excite_specials(lm.model, layout, 700 + seed)
        r = lm.generator.generate_one(prompt, replace(cfg, seed=seed))
        ids = r.ids.tolist()
        assert r.stop == "eom" and r.issues == []
        assert ids[0] == layout.id(sp.start) and ids[-1] == layout.id(sp.end) and len(ids) > 2
        assert all(sp.offset <= t < sp.stop for t in ids[1:-1])
    chat.session.config = cfg
    chat.handle("now say it")
    paths = [line.split(": ", 1)[1].split(" (")[0] for line in out.getvalue().splitlines()
             if line.startswith("-> speech: ")]
    assert len(paths) == 1
    data, sr = sf.read(paths[0])
    assert sr == 16000 and len(data) > 0


# ---------------------------------------------------------------------------------------------- the session object


def test_session_returns_events_and_prints_nothing(lm, files, tmp_path, capsys):
    """The shared session (terminal, page and API): an answer is events, in order, whose text deltas
    add up to the parsed answer; a required modality comes back as a readable file event."""
    import soundfile as sf

    speech = lm.layout.modality("speech").name
    session = _core(lm, tmp_path)
    part, notes = session.encode(speech, files / "hello.wav")
    assert notes == [] and session.tokens(part) == 50 and session.files[id(part)] == str(files / "hello.wav")
    seen = []
    cfg = GenerationConfig(max_new_tokens=60, seed=0, outputs=("text", speech), include=(speech,))
    answer = session.respond([part, Text("say it back")], on_event=seen.append, config=cfg)
    assert seen == answer.events and capsys.readouterr().out == ""
    kinds = [e.kind for e in answer.events]
    assert kinds.index("span_start") < kinds.index("span_end") < kinds.index("end") < kinds.index("file")
    assert "".join(e.text for e in answer.events if e.kind == "text").strip() == answer.text
    (f,) = answer.files
    data, sr = sf.read(f.path)
    assert f.modality == speech and sr == 16000 and len(data) > 0 and f.path.parent == tmp_path / "out"
    assert [t.role for t in session.history] == ["user", "assistant"]
    assert any(isinstance(p, Media) and p.modality == speech for p in session.history[1].parts)


def test_include_forces_a_span_and_still_allows_text(lm):
    """``include``: at least one span of the modality, text allowed before it, whatever the model does;
    the budget keeps room for it."""
    from anygpt.infer.loading import load_lm
    from anygpt.infer.testing import excite_specials

    lm = load_lm(lm.directory, device="cpu")  # private copy: weights get scrambled
    prompt = lm.generator.format.prompt(Conversation([Turn("user", [Text("hi")])]))
    image = lm.layout.modality("image")
    with_text = 0
    for seed in range(4):
        if seed:
            excite_specials(lm.model, lm.layout, 900 + seed)
        for budget in (36, 60):
            cfg = GenerationConfig(max_new_tokens=budget, seed=seed, outputs=("text", "image"), include=("image",))
            r = lm.generator.generate_one(prompt, cfg)
            spans = [p for p in r.parts if isinstance(p, Media)]
            assert r.issues == [] and r.stop == "eom" and spans and spans[0].modality == "image"
            assert spans[0].codes.shape == (1, image.span_length)
            with_text += bool(r.text.strip())
    assert with_text > 0  # text may come first: this is not ``require``
    with pytest.raises(ValueError, match="needs 35 tokens"):
        lm.generator.generate_one(prompt, GenerationConfig(max_new_tokens=20, include=("image",)))


def test_failed_turns_leave_the_session_unchanged(lm, tmp_path):
    from anygpt.infer.generation import ContextError

    session = _core(lm, tmp_path)
    session.respond([Text("first")])
    before = list(session.history)
    with pytest.raises(ContextError, match="no room for an answer"):
        session.respond([Text("word " * 3000)])
    assert session.history == before and session.turn_no == 1
    session.reset()
    assert session.history == [] and session.config.seed == 0
