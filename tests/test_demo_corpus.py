"""The synthetic demo corpus: files readable at the right rates and sizes, manifests in the DESIGN.md
schema with relative paths, held-out combinations only in test, determinism, grammar round trips."""
from __future__ import annotations

import hashlib
import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")

from anygpt.demo.corpus import (  # noqa: E402
    MUSIC_SAMPLE_RATE,
    SPEECH_SAMPLE_RATE,
    make_corpus,
    render_music,
    render_reference,
)
from anygpt import modalities as registry  # noqa: E402
from anygpt.demo.grammar import (  # noqa: E402
    all_combinations,
    attribute_values,
    describe,
    held_out_combinations,
    is_held_out,
    parse_attributes,
    demo_modalities,
    train_combinations,
)

MODALITIES = demo_modalities()

N = 12  # training items per modality: small, the test is about structure, not size


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    info = make_corpus(out, n_per_modality=N, seed=0, quick=True, n_conversations=6, progress=False)
    return info


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _key(modality: str, attrs: dict) -> tuple:
    return tuple(attrs[a] for a in attribute_values(modality))


def test_manifests_schema_and_media(corpus):
    import soundfile as sf
    from PIL import Image

    out = corpus.out_dir
    meta = json.loads(corpus.corpus_json.read_text())
    assert list(meta["grammar"]) == list(meta["media"]) == list(MODALITIES)
    for modality in MODALITIES:
        assert meta["media"][modality]["format"] == registry.get(modality).output_suffix.lstrip(".")
        for split in ("train", "test"):
            path = corpus.manifest(split, modality)
            assert path == out / f"{split}_{modality}.jsonl"
            rows = _rows(path)
            assert len(rows) == corpus.counts[modality][split]
            assert len({r["id"] for r in rows}) == len(rows)
            for r in rows:
                assert set(r) == {"id", "text", modality}
                rel = Path(r[modality])
                assert not rel.is_absolute() and (path.parent / rel).is_file()
                assert rel.suffix == registry.get(modality).output_suffix
                full = path.parent / rel
                if modality == "image":
                    with Image.open(full) as im:
                        assert im.format == "PNG" and im.mode == "RGB" and im.size == (224, 224)
                else:
                    wav, sr = sf.read(full)
                    assert wav.ndim == 1 and np.isfinite(wav).all() and np.abs(wav).max() > 0.1
                    if modality == "speech":
                        assert sr == SPEECH_SAMPLE_RATE
                        assert 0.4 < len(wav) / sr < 3.0  # short sentences, silence trimmed
                    else:
                        assert sr == MUSIC_SAMPLE_RATE and len(wav) == MUSIC_SAMPLE_RATE  # exactly 1 s
    assert corpus.counts["image"]["train"] == N


def test_held_out_only_in_test(corpus):
    meta = json.loads(corpus.corpus_json.read_text())
    for modality in MODALITIES:
        held = {_key(modality, h) for h in held_out_combinations(modality)}
        assert held == {_key(modality, h) for h in meta["held_out"][modality]}
        train_rows = _rows(corpus.manifest("train", modality))
        train = {_key(modality, parse_attributes(modality, r["text"])) for r in train_rows}
        test_rows = _rows(corpus.manifest("test", modality))
        test = {_key(modality, parse_attributes(modality, r["text"])) for r in test_rows}
        assert not (train & held), modality
        assert held <= test, modality
        novel = set(meta["test_novel_ids"][modality])
        for r in test_rows:
            assert (r["id"] in novel) == is_held_out(modality, parse_attributes(modality, r["text"]))


def test_held_out_rule_keeps_every_pair_in_training():
    for modality in MODALITIES:
        names = list(attribute_values(modality))
        train = train_combinations(modality)
        assert 0 < len(held_out_combinations(modality)) < len(all_combinations(modality))
        for a, b in itertools.combinations(names, 2):
            seen = {(c[a], c[b]) for c in train}
            assert seen == set(itertools.product(attribute_values(modality)[a], attribute_values(modality)[b]))


def test_conversations_schema(corpus):
    out = corpus.out_dir
    for split in ("train", "test"):
        rows = _rows(out / f"{split}_conversations.jsonl")
        assert len(rows) == corpus.counts["conversations"][split] and rows
        for row in rows:
            assert set(row) == {"id", "conversation"}
            roles = [t["role"] for t in row["conversation"]]
            assert roles[0] == "user" and "assistant" in roles and set(roles) <= {"user", "assistant"}
            for turn in row["conversation"]:
                for item in turn["content"]:
                    assert len(item) == 1
                    (key, value), = item.items()
                    assert key in {"text", "marker", *MODALITIES}
                    if key == "marker":
                        assert value in ("<-Ins->", "<-Res->")
                    elif key != "text":
                        assert not Path(value).is_absolute() and (out / value).is_file()
                    elif split == "train":  # training dialogues never mention a held-out combination
                        for m in MODALITIES:
                            attrs = parse_attributes(m, value)
                            if len(attrs) == len(attribute_values(m)) and m != "speech":
                                assert not is_held_out(m, attrs), value


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_deterministic_given_seed(tmp_path):
    kw = dict(n_per_modality=3, n_test=3, n_conversations=6, progress=False)
    a = make_corpus(tmp_path / "a", seed=3, workers=2, **kw)
    b = make_corpus(tmp_path / "b", seed=3, workers=1, **kw)
    c = make_corpus(tmp_path / "c", seed=4, **kw)
    assert _digest(a.out_dir) == _digest(b.out_dir)
    da, dc = _digest(a.out_dir), _digest(c.out_dir)
    assert da.keys() == dc.keys()
    assert sum(da[k] != dc[k] for k in da) > len(da) // 2


def test_speech_variety(tmp_path):
    import soundfile as sf

    kw = dict(n_per_modality=12, n_test=12, n_conversations=0, progress=False)
    with pytest.raises(ValueError, match="speech_variety"):
        make_corpus(tmp_path / "bad", speech_variety="lots", **kw)
    # "none": every sentence has exactly one rendering, identical to the canonical reference
    info = make_corpus(tmp_path / "none", speech_variety="none", **kw)
    row = _rows(info.manifest("train", "speech"))[0]
    ref = render_reference("speech", row["text"], tmp_path / "ref.wav")
    got, _ = sf.read(info.out_dir / row["speech"])
    want, _ = sf.read(ref)
    assert np.array_equal(got, want)
    meta = json.loads(info.corpus_json.read_text())
    assert meta["media"]["speech"]["variety"] == "none"


def test_parse_attributes_inverts_every_caption():
    for modality in MODALITIES:
        for combo in all_combinations(modality):
            text = describe(modality, combo)
            assert parse_attributes(modality, text) == combo
            noisy = f"Well... I think it is: {text.upper()}!! Yes."
            assert parse_attributes(modality, noisy) == combo
    assert parse_attributes("image", "A BLUE triangle, at the TOP.") == {"shape": "triangle", "colour": "blue",
                                                                        "position": "top"}
    assert parse_attributes("speech", "3 green squares") == {"number": "three", "colour": "green", "shape": "square"}
    assert parse_attributes("speech", "a red circle") == {"number": "one", "colour": "red", "shape": "circle"}
    assert parse_attributes("music", "something") == {}
    with pytest.raises(ValueError):
        parse_attributes("video", "x")


def test_render_reference(tmp_path):
    import soundfile as sf
    from PIL import Image

    p0 = render_reference("image", "a green square on the right", tmp_path / "i0.png")
    p0b = render_reference("image", "A green square, on the right!", tmp_path / "i0b.png")
    p1 = render_reference("image", "a green square on the right", tmp_path / "i1.png", variant=1)
    assert p0.read_bytes() == p0b.read_bytes() != p1.read_bytes()
    with Image.open(p0) as im:
        px = np.asarray(im)
    assert px[112, 165].tolist() != px[112, 50].tolist()  # shape on the right, background on the left
    wav, sr = sf.read(render_reference("speech", "two blue triangles", tmp_path / "s.wav"))
    assert sr == 16000 and 0.4 < len(wav) / sr < 3.0
    wav, sr = sf.read(render_reference("music", "a slow melody in a minor key on an organ", tmp_path / "m.wav"))
    assert sr == 32000 and len(wav) == 32000
    with pytest.raises(ValueError, match="does not name"):
        render_reference("music", "a slow melody", tmp_path / "x.wav")


def test_music_factors_are_audible():
    sr = MUSIC_SAMPLE_RATE

    def onsets(x):
        rms = np.sqrt((x[: len(x) // 320 * 320].reshape(-1, 320) ** 2).mean(1))
        return int((np.diff(rms) > 0.05 * rms.max()).sum())

    def rest_fraction(x):
        rms = np.sqrt((x[: len(x) // 320 * 320].reshape(-1, 320) ** 2).mean(1))
        return float((rms < 0.01 * rms.max()).mean())

    def centroid(x):
        s = np.abs(np.fft.rfft(x))
        return float((s * np.fft.rfftfreq(len(x), 1 / sr)).sum() / s.sum())

    def third_energy(x, semis):
        s, f = np.abs(np.fft.rfft(x)), np.fft.rfftfreq(len(x), 1 / sr)
        target = 261.63 * 2 ** (semis / 12)
        return float(s[np.abs(f - target) < 4].sum())

    for t in ("flute", "organ", "plucked"):
        slow = render_music({"tempo": "slow", "scale": "major", "timbre": t})
        fast = render_music({"tempo": "fast", "scale": "major", "timbre": t})
        assert onsets(fast) > onsets(slow), t
        # fast melodies are staccato: rests between notes in every clip, slow ones legato (no rests)
        assert rest_fraction(fast) > 0.2 > 0.05 > rest_fraction(slow), t
    flute = render_music({"tempo": "slow", "scale": "major", "timbre": "flute"})
    organ = render_music({"tempo": "slow", "scale": "major", "timbre": "organ"})
    assert centroid(organ) > 2 * centroid(flute)
    major = render_music({"tempo": "slow", "scale": "major", "timbre": "flute"})
    minor = render_music({"tempo": "slow", "scale": "minor", "timbre": "flute"})
    assert third_energy(major, 4) > 5 * third_energy(major, 3)
    assert third_energy(minor, 3) > 5 * third_energy(minor, 4)
