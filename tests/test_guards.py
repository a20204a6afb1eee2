"""Guards for hazards seen in this field (STYLE.md): a repo-local `tokenizers` package shadowing HF's."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_tokenizers_dir_is_data_only():
    assert not list((REPO / "tokenizers").rglob("*.py"))


def test_import_tokenizers_from_repo_root_is_huggingface():
    out = subprocess.run([sys.executable, "-c", "import tokenizers, sys; print(tokenizers.__file__); "
                          "from tokenizers import Tokenizer"], cwd=REPO, capture_output=True, text=True, check=True)
    assert "site-packages" in out.stdout or "dist-packages" in out.stdout, out.stdout
    assert str(REPO / "tokenizers") not in out.stdout


def test_packaging_ships_only_our_packages():
    text = (REPO / "pyproject.toml").read_text()
    assert 'include = ["anygpt*", "data_pipeline*"]' in text
