"""``anygpt serve``'s chat page in a real browser: Debian's chromium driven by Playwright.

Uploads a picture, asks for an answer with a picture and a sound, waits for both to appear, sets the
voice to answer in, records from the fake microphone and sends it, resets; a second browser session starts with its own empty
conversation; the page serves generated files and nothing else.  Screenshots go to the test's tmp
dir (and to ``$ANYGPT_SERVE_SCREENSHOT`` when set: how ``docs/serve.png`` is made).
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gradio", reason="gradio (test extra) is not installed")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (test extra) is not installed")
httpx = pytest.importorskip("httpx")

from anygpt.serve.testing import ServerProcess  # noqa: E402

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(CHROMIUM is None, reason="no chromium browser (apt-get install chromium)")]
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
TIMEOUT_MS = 180_000  # a turn on a busy 2-core machine


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from anygpt.infer.testing import build_tiny_model_dir

    model = build_tiny_model_dir(tmp_path_factory.mktemp("page"))
    srv = ServerProcess(["--model", str(model), "--codecs", "tiny", "--max-new-tokens", "64", "--seed", "0",
                         "--image-steps", "1", "--name", "tiny-anygpt"], env={"OMP_NUM_THREADS": "1"})
    srv.start()
    yield srv
    workdir = srv.workdir
    assert srv.stop() == 0, srv.output[-2000:]
    assert workdir is not None and not workdir.exists()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    import soundfile as sf
    from PIL import Image

    d = tmp_path_factory.mktemp("inputs")
    Image.new("RGB", (64, 48), (210, 40, 40)).save(d / "red.png")
    t = np.arange(48000 * 3) / 48000  # the fake microphone plays this file
    sf.write(d / "mic.wav", (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 48000)
    return d


def _bot_messages(page) -> int:
    return page.locator("#chat [data-testid=bot]").count()


def test_chat_page_in_a_real_browser(server, inputs, tmp_path):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS + [
            "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={inputs / 'mic.wav'}"])
        try:
            ctx = browser.new_context(viewport={"width": 1100, "height": 900}, permissions=["microphone"])
            page = ctx.new_page()
            external = []  # the page must work offline: nothing but our server is ever asked for
            page.on("request", lambda r: None if r.url.startswith(server.url) or r.url.startswith(("data:", "blob:"))
                    else external.append(r.url))
            page.goto(server.url + "/")
            page.wait_for_selector("#box textarea", timeout=TIMEOUT_MS)

            # A picture in, an answer that must hold a picture and a sound.
            page.locator("#box input[type=file]").set_input_files(str(inputs / "red.png"))
            page.wait_for_selector("#box img", timeout=TIMEOUT_MS)  # the upload's thumbnail
            page.locator("#must").get_by_label("image").check()
            page.locator("#must").get_by_label("speech").check()
            page.locator("#box textarea").fill("What is in this picture? Draw one and say it.")
            page.locator("#box textarea").press("Enter")
            page.wait_for_selector("#chat [data-testid=bot] img", timeout=TIMEOUT_MS)
            page.wait_for_selector("#chat [data-testid=bot] audio", timeout=TIMEOUT_MS, state="attached")
            page.wait_for_selector("#chat [data-testid=user] img", timeout=TIMEOUT_MS)  # our picture, shown
            time.sleep(1)  # let the waveform draw
            page.screenshot(path=str(tmp_path / "answer.png"), full_page=True)
            if os.environ.get("ANYGPT_SERVE_SCREENSHOT"):
                page.screenshot(path=os.environ["ANYGPT_SERVE_SCREENSHOT"], full_page=True)
            src = page.locator("#chat [data-testid=bot] img").first.get_attribute("src")
            got = page.request.get(src if src.startswith("http") else server.url + src)
            assert got.status == 200 and got.headers["content-type"] == "image/png"

            # The voice to answer in (an upload), then the microphone (a fake device playing mic.wav)
            # records a turn of speech, answered in speech.
            page.get_by_text("Voice and generation settings").click()
            page.locator("#voice input[type=file]").set_input_files(str(inputs / "mic.wav"))
            page.wait_for_selector("#voice audio", timeout=TIMEOUT_MS, state="attached")
            answered = _bot_messages(page)
            page.locator("#box [data-testid=microphone-button]").click()
            page.get_by_role("button", name="Start recording").click()
            time.sleep(2.0)
            page.get_by_role("button", name="Stop recording").click()
            page.wait_for_selector("#box button[aria-label='Attach audio']", timeout=TIMEOUT_MS)
            page.locator("#must").get_by_label("image").uncheck()
            page.locator("#box textarea").press("Enter")
            page.wait_for_selector("#chat [data-testid=user] audio", timeout=TIMEOUT_MS, state="attached")
            page.wait_for_function(f"document.querySelectorAll('#chat [data-testid=bot]').length > {answered}",
                                   timeout=TIMEOUT_MS)
            page.screenshot(path=str(tmp_path / "microphone.png"), full_page=True)

            # Another browser session has its own, empty conversation.
            other = browser.new_context().new_page()
            other.goto(server.url + "/")
            other.wait_for_selector("#box textarea", timeout=TIMEOUT_MS)
            assert _bot_messages(other) == 0 and _bot_messages(page) > answered

            # Reset empties this conversation.
            page.locator("#reset").click()
            page.wait_for_function("document.querySelectorAll('#chat [data-testid=bot]').length == 0",
                                   timeout=TIMEOUT_MS)
            page.screenshot(path=str(tmp_path / "reset.png"), full_page=True)
            assert external == []
        finally:
            browser.close()
    for name in ("answer.png", "microphone.png", "reset.png"):
        assert (tmp_path / name).stat().st_size > 10_000


def test_the_page_serves_its_files_and_nothing_else(server):
    outside = [Path("/etc/passwd"), Path(__file__).resolve(), server.workdir.parent / "elsewhere.txt"]
    for path in outside:
        r = httpx.get(f"{server.url}/gradio_api/file={path}", timeout=30)
        assert r.status_code == 403, (path, r.status_code)
    generated = sorted(server.workdir.rglob("*.png"))
    if generated:  # after the browser test: a generated picture is served
        assert httpx.get(f"{server.url}/gradio_api/file={generated[0]}", timeout=30).status_code == 200
