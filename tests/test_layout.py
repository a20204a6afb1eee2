import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from anygpt.layout import LayoutError, VocabLayout

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "tokenizers" / "vocab_layout.json"


def test_no_existing_id_moves():
    """The reference layout (LLaMA-2 base) is append-only: every recorded id must stay put."""
    ref = json.loads(REFERENCE.read_text(encoding="utf-8"))
    now = VocabLayout.default(ref["base_vocab_size"]).to_dict()
    for tok, tid in ref["specials"].items():
        assert now["specials"][tok] == tid, f"special {tok} moved"
    for name, m in ref["modalities"].items():
        assert now["modalities"][name] == m, f"modality {name} changed"
    assert now["total"] >= ref["total"]
    assert VocabLayout.load(REFERENCE).to_dict() == ref


def test_default_layout_is_contiguous_after_text_vocab():
    lay = VocabLayout.default(32000)
    ranges = sorted([(i, i + 1) for i in lay.specials.values()] + [(m.offset, m.stop) for m in lay.modalities.values()])
    assert ranges[0][0] == 32000
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert ranges[-1][1] == lay.total == 32000 + 12 + 8192 + 1024 + 8192


@pytest.mark.parametrize("name,k,size", [("speech", 1, 1024), ("image", 1, 8192), ("music", 4, 2048)])
def test_codes_ids_round_trip(name, k, size):
    lay = VocabLayout.default(32000)
    codes = np.random.default_rng(0).integers(0, size, (k, 37))
    ids = lay.codes_to_ids(name, codes)
    assert ids.shape == (k * 37,)
    m = lay.modality(name)
    assert ids.min() >= m.offset and ids.max() < m.stop
    back, dropped = lay.ids_to_codes(name, ids)
    assert dropped == 0 and np.array_equal(back, codes)


def test_music_is_frame_major():
    lay = VocabLayout.default(32000)
    m = lay.modality("music")
    codes = np.array([[5, 6], [7, 8], [9, 10], [11, 12]])
    ids = lay.codes_to_ids("music", codes)
    expected = [m.offset + 2048 * k + codes[k, t] for t in range(2) for k in range(4)]
    assert ids.tolist() == expected


def test_speech_uses_layer_one_of_eight():
    lay = VocabLayout.default(32000)
    codes = np.arange(8 * 5).reshape(8, 5)
    assert lay.codes_to_ids("speech", codes).tolist() == (lay.modality("speech").offset + codes[0]).tolist()


def test_incomplete_music_frame_dropped_and_reported():
    lay = VocabLayout.default(32000)
    ids = lay.codes_to_ids("music", np.zeros((4, 3), dtype=int))
    codes, dropped = lay.ids_to_codes("music", ids[:-2])
    assert codes.shape == (4, 2) and dropped == 2


def test_out_of_range_errors_are_clear():
    lay = VocabLayout.default(32000)
    with pytest.raises(LayoutError, match="code 1024 out of range"):
        lay.codes_to_ids("speech", np.array([[3, 1024]]))
    with pytest.raises(LayoutError, match="code -1 out of range"):
        lay.codes_to_ids("image", np.array([[-1]]))
    with pytest.raises(LayoutError, match="position 1 is outside"):
        lay.ids_to_codes("speech", np.array([lay.modality("speech").offset, 5]))
    bad_cycle = lay.codes_to_ids("music", np.zeros((4, 2), dtype=int))
    bad_cycle[[0, 1]] = bad_cycle[[1, 0]]
    with pytest.raises(LayoutError, match="position 0 belongs to codebook 1"):
        lay.ids_to_codes("music", bad_cycle)
    with pytest.raises(LayoutError, match="unknown modality"):
        lay.codes_to_ids("video", np.zeros((1, 2)))


def test_save_load_round_trip(tmp_path):
    lay = VocabLayout.default(500)
    path = lay.save(tmp_path)
    assert path.name == "vocab_layout.json"
    assert VocabLayout.load(tmp_path) == lay
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(LayoutError, match="broken.json"):
        VocabLayout.load(tmp_path / "broken.json")


def test_overlapping_layout_rejected():
    d = VocabLayout.default(100).to_dict()
    d["modalities"]["speech"]["offset"] = d["modalities"]["image"]["offset"] + 5
    with pytest.raises(LayoutError, match="overlaps"):
        VocabLayout.from_dict(d)


def test_tiny_tokenizer_holds_layout_tokens(tiny_tokenizer, tiny_layout):
    vocab = tiny_tokenizer.get_vocab()
    assert len(tiny_tokenizer) == tiny_layout.total
    for m in tiny_layout.modalities.values():
        assert vocab[f"<{m.prefix}0>"] == m.offset
        assert vocab[f"<{m.prefix}{m.size - 1}>"] == m.stop - 1
    for tok, tid in tiny_layout.specials.items():
        assert vocab[tok] == tid
    assert tiny_layout.roles["assistant"] == "[AnyGPT]"


def test_layout_from_anygpt_tokenizer(anygpt_tokenizer_dir):
    from anygpt.text_tokenizer import load_tokenizer

    lay = VocabLayout.from_tokenizer(load_tokenizer(anygpt_tokenizer_dir))
    base = lay.base_vocab_size
    assert lay.roles == {"user": "[Human]", "assistant": "[MMGPT]", "user_end": "<eoh>", "assistant_end": "<eos>"}
    assert lay.specials["[Human]"] == base
    assert lay.modality("image").offset == base + 4
    assert lay.specials["<soim>"] == base + 4 + 8192
    assert lay.modality("speech").offset == base + 4 + 8194
    assert lay.modality("music").offset == base + 4 + 8194 + 1026
    assert lay.total == base + 4 + 8194 + 1026 + 8194
    # Token strings and arithmetic agree.
    tok = load_tokenizer(anygpt_tokenizer_dir)
    assert tok.convert_tokens_to_ids("<🎶4097>") == lay.codes_to_ids("music", np.array([[0], [0], [1], [0]]))[2]


def test_non_contiguous_anygpt_tokenizer_rejected(tmp_path):
    from anygpt.text_tokenizer import load_tokenizer
    from conftest import make_anygpt_style_tokenizer

    d = make_anygpt_style_tokenizer(tmp_path, break_contiguity=True)
    with pytest.raises(LayoutError, match="speech.*not contiguous: <🗣️10>"):
        VocabLayout.from_tokenizer(load_tokenizer(d))


@pytest.mark.parametrize("which", ["tiny_tokenizer_dir", "anygpt_tokenizer_dir"])
def test_layout_cli_json(which, request):
    d = request.getfixturevalue(which)
    out = subprocess.run([sys.executable, "-m", "anygpt.cli", "layout", "--tokenizer", str(d), "--json"],
                         capture_output=True, text=True, check=True).stdout
    info = json.loads(out)
    lay = VocabLayout.from_tokenizer(__import__("anygpt.text_tokenizer", fromlist=["x"]).load_tokenizer(d))
    assert info["total"] == lay.total and info["base_vocab_size"] == lay.base_vocab_size
    assert info["modalities"]["music"] == {"offset": lay.modality("music").offset, "size": 8192, "codebooks": 4,
                                           "codebook_size": 2048, "start": "<somu>", "end": "<eomu>",
                                           "last_id": lay.modality("music").stop - 1, "codec": "encodec_32khz"}
    assert info["missing"] == [] and info["source"] in ("vocab_layout.json", "tokenizer")
    assert set(info["specials"]) >= {"[Human]", "<eoh>", "<soim>", "<eoim>", "<sosp>", "<eosp>", "<somu>", "<eomu>"}


def test_layout_cli_missing_dir_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "anygpt.cli", "layout", "--tokenizer", str(tmp_path / "nope")],
                       capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0 and "nope" in r.stderr
