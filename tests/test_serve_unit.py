"""``anygpt serve`` without a server: request validation, the media-root rule, turn settings, the queue."""
from __future__ import annotations

import base64
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from anygpt.infer.mediaio import MediaInputError, modality_for_file
from anygpt.infer.settings import GenerationConfig
from anygpt.layout import VocabLayout
from anygpt.modalities.plugin import ImageModality
from anygpt.serve import api  # request reading is ours: no web extra needed
from anygpt.serve.engine import Busy, Engine, turn_config
from anygpt.serve.limits import Limits


@pytest.fixture()
def engine(tmp_path):
    """An engine around a layout only (no model): what request reading needs."""
    layout = VocabLayout.default(320)
    lm = SimpleNamespace(layout=layout)
    media = SimpleNamespace(voice_modality="speech")
    root = tmp_path / "root"
    root.mkdir()
    eng = Engine(lm, media, GenerationConfig(max_new_tokens=64), "m", media_root=root,
                 limits=Limits(body_bytes=1 << 20, media_bytes=1000, queue=1), workdir=tmp_path / "work")
    return eng


def _read(engine, tmp_path, **body):
    work = tmp_path / "req"
    work.mkdir(exist_ok=True)
    return api.RequestReader(engine, work).read({"model": "m", **body})


def _user(content):
    return [{"role": "user", "content": content}]


def test_a_valid_request_becomes_turns_and_settings(engine, tmp_path):
    png = base64.b64encode(b"\x89PNG fake").decode()
    req = _read(engine, tmp_path, messages=[
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": [{"type": "text", "text": "hello"}]},
        {"role": "user", "content": [{"type": "text", "text": "look"},
                                     {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}},
                                     {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "flac"}}]}],
        temperature=0.5, top_p=0.9, max_tokens=500, seed=7, modalities=["text", "audio"], audio={"format": "flac"})
    assert req.system == "be brief" and [r for r, _ in req.turns] == ["user", "assistant", "user"]
    text, image, audio = req.turns[-1][1]
    assert image.modality == "image" and image.path.read_bytes() == b"\x89PNG fake" and image.path.suffix == ".png"
    assert audio.modality == "speech" and audio.path.suffix == ".flac"  # spoken audio: the transcript modality
    cfg = req.config
    assert cfg.max_new_tokens == 64  # never more than the server's budget
    assert cfg.seed == 7 and cfg.outputs == ("text", "speech") and cfg.include == ("speech",)
    assert {s.temperature for s in cfg.modes.values()} == {0.5} and {s.top_p for s in cfg.modes.values()} == {0.9}
    assert req.audio_modality == "speech" and req.audio_format == "flac"


@pytest.mark.parametrize("body, status, code", [
    ({"messages": []}, 400, "invalid_value"),
    ({"messages": [{"role": "tool", "content": "x"}]}, 400, "unsupported_role"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, 400, "invalid_value"),
    ({"messages": _user([{"type": "file", "file": {}}])}, 400, "unsupported_content"),
    ({"messages": _user([{"type": "image_url", "image_url": {"url": "data:image/png;base64,!!"}}])}, 400, "invalid_base64"),
    ({"messages": _user([{"type": "image_url", "image_url": {"url": "data:image/png,plain"}}])}, 400, "invalid_image_url"),
    ({"messages": _user([{"type": "image_url", "image_url": {"url": "data:audio/wav;base64,AAAA"}}])}, 400,
     "unsupported_media"),  # an image_url part must hold a picture
    ({"messages": _user([{"type": "image_url", "image_url": {"url": "ftp://x/y.png"}}])}, 400, "unsupported_url"),
    ({"messages": _user([{"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 2000}}])}, 413,
     "media_too_large"),
    ({"messages": _user([{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "mp3"}}])}, 400,
     "unsupported_media"),
    ({"messages": _user([{"type": "anygpt_media", "anygpt_media": {"modality": "video", "data": "AAAA"}}])}, 400,
     "invalid_value"),
    ({"messages": _user("hi"), "modalities": ["text", "smell"]}, 400, "unsupported_value"),
    ({"messages": _user("hi"), "temperature": 3}, 400, "invalid_value"),
    ({"messages": _user("hi"), "top_p": 0}, 400, "invalid_value"),
    ({"messages": _user("hi"), "max_tokens": 0}, 400, "invalid_value"),
    ({"messages": _user("hi"), "n": 2}, 400, "invalid_value"),
    ({"messages": _user("hi"), "audio": {"format": "opus"}}, 400, "unsupported_value"),
    ({"messages": _user("hi"), "model": "other"}, 404, "model_not_found"),
])
def test_malformed_requests_are_refused_with_their_code(engine, tmp_path, body, status, code):
    with pytest.raises(api.ApiError) as info:
        _read(engine, tmp_path, **body)
    assert (info.value.status, info.value.code) == (status, code), info.value.message
    err = info.value.body()["error"]
    assert set(err) == {"message", "type", "param", "code"}


def test_file_urls_only_inside_the_media_root(engine, tmp_path):
    root = engine.media_root
    (root / "a.png").write_bytes(b"x")
    (root / "sub").mkdir()
    (tmp_path / "secret.png").write_bytes(b"y")
    (root / "out.png").symlink_to(tmp_path / "secret.png")

    def url_status(url):
        try:
            _read(engine, tmp_path, messages=_user([{"type": "image_url", "image_url": {"url": url}}]))
            return 200
        except api.ApiError as e:
            return e.status

    assert url_status((root / "a.png").as_uri()) == 200
    assert url_status(f"file://{root}/sub/../a.png") == 200  # resolved, still inside
    assert url_status(f"file://{root}/../secret.png") == 403
    assert url_status((root / "out.png").as_uri()) == 403  # a symlink pointing out
    assert url_status("file:///etc/passwd") == 403
    assert url_status(f"file://{root}/missing.png") == 400
    assert url_status(f"file://otherhost{root}/a.png") == 400
    engine.media_root = None
    assert url_status((root / "a.png").as_uri()) == 403  # no --media-root: no file: URLs at all


def test_uploads_find_their_modality_from_the_plugins():
    layout = VocabLayout.default(320)
    assert modality_for_file(layout, ".PNG") == "image"
    assert modality_for_file(layout, ".wav") == "speech"  # speech and music read .wav: spoken audio wins
    assert modality_for_file(VocabLayout.default(320, ["music"]), ".wav") == "music"
    with pytest.raises(MediaInputError, match="reads no .wav files here"):
        modality_for_file(layout, ".wav", ImageModality)
    with pytest.raises(MediaInputError, match="reads no .txt files"):
        modality_for_file(layout, "txt")


def test_turn_config_changes_every_mode_and_caps_the_budget():
    base = GenerationConfig(max_new_tokens=100, seed=1)
    cfg = turn_config(base, temperature=0.3, max_new_tokens=1000, max_tokens={"speech": 20}, include=("image",))
    assert cfg.max_new_tokens == 100 and cfg.seed == 1 and cfg.include == ("image",)
    assert all(s.temperature == 0.3 for s in cfg.modes.values())
    assert cfg.modes["speech"].max_tokens == 20 and cfg.modes["text"].max_tokens == base.modes["text"].max_tokens
    assert base.modes["text"].temperature != 0.3  # the server's defaults are left alone
    with pytest.raises(ValueError):
        turn_config(base, top_p=1.5)


def test_turns_take_the_model_one_at_a_time_and_a_full_queue_is_refused(engine):
    held, release, order = threading.Event(), threading.Event(), []

    def first():
        with engine.turn():
            order.append("first")
            held.set()
            release.wait(10)

    def second():
        with engine.turn():
            order.append("second")

    a = threading.Thread(target=first)
    a.start()
    held.wait(10)
    b = threading.Thread(target=second)
    b.start()  # waits: queue=1
    for _ in range(100):
        if engine._waiting == 2:
            break
        threading.Event().wait(0.01)
    with pytest.raises(Busy):  # a third would be the second waiting: refused at once
        with engine.turn():
            pass
    release.set()
    a.join(10)
    b.join(10)
    assert order == ["first", "second"]
    with engine.turn():  # and the engine serves on
        pass


def test_the_command_refuses_bad_options_before_loading_a_model(tmp_path, capsys, monkeypatch):
    """``anygpt serve``: a missing --media-root, a limit <= 0 and a taken port are one ``error:`` line
    each, exit 1, before any model is read (the model directory here does not even exist), and no
    temporary directory is left behind."""
    import socket
    import tempfile

    pytest.importorskip("uvicorn")
    from anygpt.cli import main

    model = str(tmp_path / "no-model")
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = str(taken.getsockname()[1])
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))  # where a server's temporary directory would go
    try:
        for argv, message in (
                (["--media-root", str(tmp_path / "nope")], "--media-root"),
                (["--max-body-mb", "0"], "--max-body-mb"),
                (["--port", port], f"cannot listen on 127.0.0.1:{port}")):
            assert main(["serve", "--model", model, "--no-page", *argv]) == 1
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
            assert "config.json" not in err[0]  # refused before the model was looked at
    finally:
        taken.close()
    assert list(temp.iterdir()) == []
