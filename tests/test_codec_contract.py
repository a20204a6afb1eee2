"""The modality registry and the codec contract.  The toy modality (``tests/toy_modality.py`` + its
card) is registered only in subprocesses, as a user's plugin would be, so this session's registry
keeps the built-in modalities."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from anygpt import modalities as registry
from anygpt.layout import VocabLayout
from anygpt.modalities import CodecError, build_codec, load_codecs

REPO = Path(__file__).resolve().parents[1]
TOY = str(REPO / "tests" / "toy_modality.py")


def run_with_toy(code: str) -> str:
    env = {**os.environ, registry.PLUGINS_ENV: TOY, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_builtin_registry_order_is_the_reference_layout_order():
    assert registry.names()[:3] == ("image", "speech", "music")
    assert all(registry.get(m).founding for m in registry.names()[:3])
    for m in registry.names():
        assert registry.codec_names(m)[0] == registry.get(m).default_codec


def test_registry_errors(tmp_path):
    with pytest.raises(CodecError, match="unknown modality 'video'; known: image, speech, music"):
        build_codec("video", "tiny")
    with pytest.raises(CodecError, match="'encodec_32khz'.*is a music codec, not a speech one"):
        build_codec("speech", "tiny", codec="encodec_32khz")
    with pytest.raises(CodecError, match="no card for codec 'nope'"):
        build_codec("speech", "tiny", codec="nope")
    with pytest.raises(CodecError, match="no 'music/' codec directory"):
        load_codecs(tmp_path, modalities=("music",))
    with pytest.raises(CodecError, match="holds no codec directory"):
        load_codecs(tmp_path)
    build_codec("music", "tiny").save(tmp_path / "music")
    with pytest.raises(CodecError, match="holds a music codec .encodec_32khz., not a speech one"):
        build_codec("speech", tmp_path / "music")
    assert list(load_codecs(tmp_path)) == ["music"]


def test_toy_modality_plugin_appends_and_round_trips(tmp_path):
    """A modality defined in a test module only: registered last, its range appended after every
    existing id (which stay where the reference layout puts them), its codec built from its card,
    fitted, saved and loaded back with the same codes, and read/written through its plugin."""
    out = run_with_toy(f"""
import json, numpy as np
from anygpt import modalities as r
from anygpt.layout import VocabLayout
from anygpt.modalities.fit import fit_codec
print(r.names())
ref = VocabLayout.load({str(REPO / 'tokenizers' / 'vocab_layout.json')!r})
new = VocabLayout.default(ref.base_vocab_size)
assert all(new.specials[t] == i for t, i in ref.specials.items())
assert all(new.modalities[m].offset == s.offset and new.modalities[m].size == s.size for m, s in ref.modalities.items())
toy = new.modalities['toy']
assert new.specials['<soty>'] == ref.total and toy.offset == ref.total + 2 and new.total == toy.stop
assert (toy.num_codebooks, toy.codebook_size, toy.codec) == (1, 16, 'toy_scalar')
traces = []
for i in range(6):
    t = np.sin(np.linspace(0, 3 + i, 200)).astype(np.float32) * (0.3 + 0.1 * i)
    np.save({str(tmp_path)!r} + f'/t{{i}}.npy', t); traces.append({str(tmp_path)!r} + f'/t{{i}}.npy')
codec, report = fit_codec('toy', traces, {str(tmp_path / 'codecs' / 'toy')!r}, iters=5)
print(report.summary())
again = r.load_codecs({str(tmp_path / 'codecs')!r})['toy']
item, info = r.get('toy').read(traces[2], again)
assert np.array_equal(again.encode([item])[0], codec.encode([item])[0]) and info['seconds'] == 2.0
back = again.decode(again.encode([item]))[0]
path = r.get('toy').write({str(tmp_path / 'back.npy')!r}, back, again)
assert np.load(path).shape == (200,)
""")
    assert "('image', 'speech', 'music', 'toy')" in out
    assert "fit toy: 6 inputs" in out


def test_checkpoint_layouts_made_before_a_plugin_keep_every_id(tmp_path):
    """A layout saved without the toy modality loads unchanged once the plugin is installed."""
    saved = VocabLayout.default(1000)
    saved.save(tmp_path)
    out = run_with_toy(f"""
from anygpt.layout import VocabLayout
old = VocabLayout.load({str(tmp_path)!r})
print(sorted(old.modalities), old.missing(), old.total)
""")
    assert out.split("\n")[0] == f"['image', 'music', 'speech'] ['toy'] {saved.total}"


def test_contract_round_trip_of_every_codec():
    for m in registry.names():
        for name in registry.codec_names(m):
            codec = build_codec(m, "tiny", codec=name)
            assert codec.card["name"] == name and codec.modality == m
            assert 1 <= codec.lm_codebooks <= codec.num_codebooks
