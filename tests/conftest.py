"""Shared fixtures: tiny tokenizers (ours and AnyGPT-style), built once per test session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never touch a hub; fail fast instead of hanging on a network call.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Gradio (imported by the serve tests) never phones home, whoever runs the tests.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

CORPUS = [
    "a red circle on the left", "a blue square at the top", "a green triangle in the middle",
    "the speaker says hello world", "a slow song in a minor key played on piano",
    "three yellow stars on a white background", "please describe the picture",
    "transcribe the following speech", "compose a cheerful tune", "one two three four five",
] * 20


def make_tiny_tokenizer(out_dir: Path) -> Path:
    """Tiny SentencePiece tokenizer with our layout's added tokens (the real code path)."""
    from anygpt.text_tokenizer import prepare_tokenizer, train_tiny_tokenizer

    raw = train_tiny_tokenizer(CORPUS, out_dir / "raw", vocab_size=320)
    prepare_tokenizer(raw, out_dir / "tok")
    return out_dir / "tok"


def make_anygpt_style_tokenizer(out_dir: Path, break_contiguity: bool = False) -> Path:
    """A tokenizer laid out like the released AnyGPT ones (roles, then per modality <prefixN> + markers)."""
    from anygpt.text_tokenizer import load_tokenizer, train_tiny_tokenizer

    raw = train_tiny_tokenizer(CORPUS, out_dir / "raw", vocab_size=320)
    tok = load_tokenizer(raw)
    tok.add_tokens(["[Human]", "[MMGPT]", "<eoh>", "<eos>"])
    for prefix, n, start, end in [("👀", 8192, "<soim>", "<eoim>"), ("🗣️", 1024, "<sosp>", "<eosp>"),
                                  ("🎶", 8192, "<somu>", "<eomu>")]:
        tokens = [f"<{prefix}{i}>" for i in range(n)]
        if break_contiguity and prefix == "🗣️":
            tokens[10], tokens[11] = tokens[11], tokens[10]
        tok.add_tokens(tokens + [start, end])
    tok.save_pretrained(str(out_dir / "anygpt_tok"))
    return out_dir / "anygpt_tok"


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    return make_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tokenizer"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir):
    from anygpt.text_tokenizer import load_tokenizer

    return load_tokenizer(tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_layout(tiny_tokenizer):
    from anygpt.layout import VocabLayout

    return VocabLayout.from_tokenizer(tiny_tokenizer)


@pytest.fixture(scope="session")
def anygpt_tokenizer_dir(tmp_path_factory) -> Path:
    return make_anygpt_style_tokenizer(tmp_path_factory.mktemp("anygpt_tokenizer"))


@pytest.fixture(scope="session")
def installed_anygpt(tmp_path_factory) -> Path:
    """``bin/`` of a fresh virtual environment holding a *non-editable* install of this checkout.

    The environment sees the machine's packages (``--system-site-packages``: torch and the other
    dependencies are not installed twice), but ``anygpt`` itself is a wheel built from the checkout,
    so tests that run it from an empty directory prove the package works without the source tree.
    """
    import shutil
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    root = tmp_path_factory.mktemp("install")
    # Build from a copy (symlinks kept, so anygpt/shipped still points at the copied configs): pip
    # builds in the source tree and would leave build/ and *.egg-info in the checkout.
    src = root / "src"
    shutil.copytree(repo, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", "build", "*.egg-info", "__pycache__", "runs", "demo", ".pytest_cache"))
    venv = root / "env"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--no-deps", "--disable-pip-version-check",
                    str(src)], check=True, capture_output=True)
    return venv / "bin"
