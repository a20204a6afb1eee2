"""The package works installed (not editable) and run from a directory with no source tree in sight."""
import json
import os
import subprocess
from pathlib import Path

import pytest


def run(bin_dir: Path, *argv: str, cwd: Path, **kw) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([str(bin_dir / argv[0]), *argv[1:]], cwd=cwd, capture_output=True, text=True, env=env,
                          timeout=600, **kw)


@pytest.mark.slow
def test_installed_package_finds_its_configs_from_an_empty_directory(installed_anygpt, tmp_path):
    here = tmp_path / "empty"
    here.mkdir()
    where = run(installed_anygpt, "python", "-c", "import anygpt; print(anygpt.__file__)", cwd=here)
    assert str(installed_anygpt.parent) in where.stdout, where.stdout + where.stderr
    listed = run(installed_anygpt, "anygpt", "configs", "list", cwd=here)
    assert listed.returncode == 0 and "zero3" in listed.stdout and "tiny_cpu" in listed.stdout
    assert "speechtokenizer" in listed.stdout
    path = Path(run(installed_anygpt, "anygpt", "configs", "path", "stage1_pretrain", cwd=here).stdout.strip())
    assert path.is_file() and str(installed_anygpt.parent) in str(path)
    assert run(installed_anygpt, "anygpt", "configs", "cp", "zero3", "mine.json", cwd=here).returncode == 0
    assert json.loads((here / "mine.json").read_text())["zero_optimization"]["stage"] == 3
    again = run(installed_anygpt, "anygpt", "configs", "cp", "zero3", "mine.json", cwd=here)
    assert again.returncode == 1 and "exists" in again.stderr and len(again.stderr.strip().splitlines()) == 1
    # Codec cards and the default layout come from the package data, not the checkout.
    layout = run(installed_anygpt, "python", "-c", "from anygpt.layout import VocabLayout; "
                 "print(VocabLayout.default(32000).total)", cwd=here)
    assert layout.stdout.strip() == "49420", layout.stderr
