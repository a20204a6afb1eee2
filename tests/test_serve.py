"""``anygpt serve``'s API with the official ``openai`` client: text, images and audio in and out,
streaming, every refusal as a 4xx in the API's error shape with the server serving on, the page
serving nothing but its own files, and the temporary directory gone after a stop."""
from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest

openai = pytest.importorskip("openai", reason="the official openai client (test extra) is not installed")
pytest.importorskip("gradio", reason="gradio (test extra) is not installed")
httpx = pytest.importorskip("httpx")

from anygpt.serve.testing import ServerProcess  # noqa: E402

pytestmark = pytest.mark.slow  # one server for the module: ~1 min on a CPU

KEY = "test-key-14"
CONTEXT = 512


def _wav_bytes(seconds: float = 1.0, sr: int = 16000, fmt: str = "WAV") -> bytes:
    import soundfile as sf

    t = np.arange(int(seconds * sr)) / sr
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), sr, format=fmt)
    return buf.getvalue()


def _png_bytes(size=(48, 40), colour=(30, 160, 220)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("media_root")
    (root / "inside.png").write_bytes(_png_bytes())
    outside = tmp_path_factory.mktemp("elsewhere")
    (outside / "secret.png").write_bytes(_png_bytes(colour=(0, 0, 0)))
    (root / "link.png").symlink_to(outside / "secret.png")  # a way out of the root that must stay shut
    return root, outside


@pytest.fixture(scope="module")
def server(tmp_path_factory, files):
    from anygpt.infer.testing import build_tiny_model_dir

    model = build_tiny_model_dir(tmp_path_factory.mktemp("serve"))
    root, _ = files
    srv = ServerProcess(["--model", str(model), "--codecs", "tiny", "--max-new-tokens", "64", "--seed", "0",
                         "--image-steps", "1", "--context", str(CONTEXT), "--media-root", str(root),
                         "--api-key", KEY, "--max-body-mb", "1", "--max-media-mb", "0.5", "--name", "tiny-anygpt"],
                        env={"OMP_NUM_THREADS": "1"})
    srv.start()
    yield srv
    workdir = srv.workdir
    assert srv.stop() == 0, srv.output[-2000:]
    assert "stopped; temporary files removed" in srv.output
    assert workdir is not None and not workdir.exists()  # uploads and generated media are gone


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def _ask(client, content, **kw):
    return client.chat.completions.create(model="tiny-anygpt", messages=[{"role": "user", "content": content}],
                                          **{"max_tokens": 24, **kw})


def _still_serving(client):
    r = _ask(client, "are you still there?", max_tokens=8)
    assert r.choices[0].message.role == "assistant" and isinstance(r.choices[0].message.content, str)


def test_models_and_text_in_text_out(client):
    assert [m.id for m in client.models.list().data] == ["tiny-anygpt"]
    r = _ask(client, "hello there", seed=1)
    choice = r.choices[0]
    assert r.object == "chat.completion" and r.model == "tiny-anygpt"
    assert isinstance(choice.message.content, str) and choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 0 and 1 <= r.usage.completion_tokens <= 24
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    again = _ask(client, "hello there", seed=1)
    assert again.choices[0].message.content == choice.message.content  # a seed makes answers reproducible
    assert not getattr(choice.message, "anygpt_media", None)


def test_image_and_audio_in(client, files):
    """Media parts reach the model: the prompt grows by the image's 32 codes / the clip's 50 frames per second."""
    base = _ask(client, "what is this?").usage.prompt_tokens
    png = _ask(client, [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{_b64(_png_bytes())}"}},
                        {"type": "text", "text": "what is this?"}])
    assert png.usage.prompt_tokens >= base + 32
    root, _ = files
    local = _ask(client, [{"type": "image_url", "image_url": {"url": (root / "inside.png").as_uri()}},
                          {"type": "text", "text": "what is this?"}])
    assert local.usage.prompt_tokens == png.usage.prompt_tokens  # same picture size, same tokens
    for fmt in ("wav", "flac"):
        clip = _ask(client, [{"type": "input_audio", "input_audio": {"data": _b64(_wav_bytes(1.0, fmt=fmt.upper())),
                                                                      "format": fmt}},
                             {"type": "text", "text": "what is this?"}])
        assert clip.usage.prompt_tokens >= base + 50


def test_audio_out_like_the_official_api(client):
    import soundfile as sf

    r = _ask(client, "say hello", modalities=["text", "audio"], audio={"voice": "alloy", "format": "wav"},
             max_tokens=48)
    msg = r.choices[0].message
    assert msg.audio is not None and msg.content is None and isinstance(msg.audio.transcript, str)
    assert msg.audio.id.startswith("audio_") and msg.audio.expires_at > 0
    data, sr = sf.read(io.BytesIO(base64.b64decode(msg.audio.data)))
    assert sr == 16000 and len(data) > 0


def test_image_out_in_the_extension_field(client):
    from PIL import Image

    r = _ask(client, "draw a red bus", modalities=["text", "image"], max_tokens=48)
    media = r.choices[0].message.model_extra["anygpt_media"]
    assert [m["modality"] for m in media][:1] == ["image"] and media[0]["mime_type"] == "image/png"
    img = Image.open(io.BytesIO(base64.b64decode(media[0]["data"])))
    img.load()
    assert img.size[0] > 0 and isinstance(r.choices[0].message.content, str)


def test_streaming_text_deltas(client, server):
    full = _ask(client, "tell me more", seed=3, max_tokens=20).choices[0].message.content
    chunks = list(client.chat.completions.create(
        model="tiny-anygpt", messages=[{"role": "user", "content": "tell me more"}], seed=3, max_tokens=20,
        stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() == full  # the streamed deltas add up to the answer
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1
    # The wire format: SSE data lines ending with [DONE]; audio arrives in a delta before the end.
    body = {"model": "tiny-anygpt", "messages": [{"role": "user", "content": "sing"}], "stream": True,
            "modalities": ["text", "audio"], "audio": {"format": "wav"}, "max_tokens": 40}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                   timeout=120)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    deltas = [json.loads(e)["choices"][0]["delta"] for e in events[:-1]]
    assert any("audio" in d and d["audio"]["data"] for d in deltas)


BAD_BODY = "x" * (2 << 20)  # twice the server's --max-body-mb 1


@pytest.mark.parametrize("name, status, request_kw", [
    ("bad base64", 400, dict(content=[{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@not-b64@@"}}])),
    ("unreadable image", 400, dict(content=[{"type": "image_url",
                                             "image_url": {"url": "data:image/png;base64," + _b64(b"not a png" * 10)}}])),
    ("unreadable audio", 400, dict(content=[{"type": "input_audio",
                                             "input_audio": {"data": _b64(b"RIFF....WAVEjunk"), "format": "wav"}}])),
    ("unsupported audio format", 400, dict(content=[{"type": "input_audio",
                                                     "input_audio": {"data": _b64(b"abc"), "format": "mp3"}}])),
    ("unsupported part type", 400, dict(content=[{"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AA=="}}])),
    ("http URL", 400, dict(content=[{"type": "image_url", "image_url": {"url": "http://example.com/cat.png"}}])),
    ("prompt longer than the context", 400, dict(content="word " * (CONTEXT + 50))),
    ("unknown modality", 400, dict(content="hi", modalities=["text", "video"])),
    ("file outside the media root", 403, dict(content=[{"type": "image_url",
                                                         "image_url": {"url": "file:///etc/hostname"}}])),
    ("symlink out of the media root", 403, "link"),
    ("oversized body", 413, dict(content=BAD_BODY)),
    ("oversized media", 413, dict(content=[{"type": "image_url",
                                            "image_url": {"url": "data:image/png;base64," + _b64(b"\0" * 600_000)}}])),
    ("unknown model", 404, "model"),
])
def test_bad_requests_get_4xx_and_the_server_goes_on(client, files, name, status, request_kw):
    root, _ = files
    try:
        if request_kw == "link":
            _ask(client, [{"type": "image_url", "image_url": {"url": (root / "link.png").as_uri()}}])
        elif request_kw == "model":
            client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
        else:
            kw = dict(request_kw)
            _ask(client, kw.pop("content"), **kw)
    except openai.APIStatusError as e:
        assert e.status_code == status, (name, e.response.text[:300])
        err = e.response.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], err
        assert "anygpt-serve-" not in err["message"]  # no server paths in what the client sees
    else:
        pytest.fail(f"{name}: accepted")
    _still_serving(client)


def test_api_key_is_required(server, client):
    for key in ("wrong-key", None):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        for method, path, body in (("GET", "/v1/models", None), ("POST", "/v1/chat/completions",
                                                                   {"model": "tiny-anygpt", "messages": []})):
            r = httpx.request(method, server.url + path, json=body, headers=headers, timeout=30)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0).models.list()
    _still_serving(client)


def test_the_page_serves_nothing_else(server):
    for path in ("/etc/passwd", str(Path(__file__).resolve()), str(server.workdir / ".." / "x")):
        r = httpx.get(f"{server.url}/gradio_api/file={path}", timeout=30)
        assert r.status_code in (401, 403, 404), (path, r.status_code)
    # With an API key the page needs it too (Gradio login): its config is not served without.
    assert httpx.get(server.url + "/config", timeout=30).status_code == 401
    r = httpx.post(server.url + "/v1/chat/completions", content=b"{not json", timeout=30,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"


def test_concurrent_clients_are_queued_not_dropped(client):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda i: _ask(client, f"question {i}", max_tokens=8, seed=i), range(8)))
    assert all(isinstance(a.choices[0].message.content, str) for a in answers)


def test_bench_serve_loses_nothing():
    """``anygpt bench serve`` (short): concurrent clients, every request answered or cleanly refused."""
    from anygpt.serve.bench import bench_serve

    r = bench_serve(clients=3, requests=12, max_tokens=8)
    assert r["lost"] == 0 and r["answered"] == 11 and r["clean_errors"] == 1  # request 7 is malformed on purpose
    assert r["statuses"] == {"200": 11, "400": 1} and r["served_ratio"] == 1.0
    assert r["requests_per_s"] > 0 and 0 < r["latency_p50_s"] <= r["latency_p95_s"]


def test_a_plugin_modality_is_served_too(tmp_path):
    """The toy modality (registered through $ANYGPT_PLUGINS, named nowhere in the package) goes in as an
    ``anygpt_media`` part and comes out, when asked for in ``modalities``, in ``message.anygpt_media``."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    env = {"ANYGPT_PLUGINS": str(repo / "tests" / "toy_modality.py"), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", "import sys; from anygpt.infer.testing import build_tiny_model_dir; "
                    "build_tiny_model_dir(sys.argv[1])", str(tmp_path)], check=True, env={**os.environ, **env},
                   capture_output=True, timeout=300)
    with ServerProcess(["--model", str(tmp_path / "model"), "--codecs", "tiny", "--no-page", "--seed", "0",
                        "--max-new-tokens", "48", "--name", "toy"], env=env) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="-", max_retries=0, timeout=120)
        assert "toy" in client.models.list().data[0].model_extra["anygpt_modalities"]
        trace = io.BytesIO()
        np.save(trace, np.sin(np.linspace(0, 6, 40)).astype(np.float32))
        part = {"type": "anygpt_media", "anygpt_media": {"modality": "toy", "mime_type": "application/x-npy",
                                                         "data": _b64(trace.getvalue())}}
        plain = client.chat.completions.create(model="toy", messages=[{"role": "user", "content": "hi"}], max_tokens=8)
        r = client.chat.completions.create(model="toy", messages=[{"role": "user", "content": [part]}],
                                           modalities=["text", "toy"], max_tokens=40)
        assert r.usage.prompt_tokens > plain.usage.prompt_tokens  # the trace's codes are in the prompt
        media = r.choices[0].message.model_extra["anygpt_media"]
        assert media[0]["modality"] == "toy"
        out = np.load(io.BytesIO(base64.b64decode(media[0]["data"])))
        assert out.ndim == 1 and out.size > 0
