"""Preprocessing driven by the modality registry: a plugin modality (the toy one, in a subprocess)
goes through every reader that names media and its codes decode; ``--codec NAME`` picks a codec and
is pinned in ``run.json``; per-modality duration limits; ``wds-pairs`` suffixes; checks against the
run's codec cards.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from anygpt import modalities as registry
from data_pipeline import synthetic as S
from data_pipeline.options import Limits, PreprocessError, PreprocessOptions
from data_pipeline.readers import build_reader
from data_pipeline.runner import run_preprocess
from data_pipeline.shards import iter_samples

REPO = Path(__file__).resolve().parents[1]
TOY = REPO / "tests" / "toy_modality.py"


def _cli(args: list[str]) -> tuple[int, str]:
    from data_pipeline.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(args)
    return rc, err.getvalue()


def _opts(source: str, path: Path, out: Path, **kw) -> PreprocessOptions:
    return PreprocessOptions(source=source, input=str(path), out=str(out), tiny=True, progress=False,
                             shard_size=4, batch_size=2, **kw)


# ------------------------------------------------------------------------ a plugin modality
TOY_SCRIPT = r"""
import json, sys
from pathlib import Path
import numpy as np
from anygpt import cli, modalities as registry
from data_pipeline.shards import iter_samples

root = Path(sys.argv[1])
traces = {p.stem: np.load(p) for p in sorted((root / "traces").glob("t*.npy"))}
fit = [str(root / "traces" / f"{k}.npy") for k in traces]
assert cli.main(["codec", "fit", "--modality", "toy", "--inputs", *fit, "--out", str(root / "codecs"),
                 "--iters", "5"]) == 0
codec = registry.load_codecs(root / "codecs")["toy"]
report = {}
for name, args in {
    "manifest": ["--source", "manifest", "--input", str(root / "manifest.jsonl")],
    "conversations": ["--source", "conversations", "--input", str(root / "chat.jsonl")],
    "wds": ["--source", "wds-pairs", "--input", str(root / "tars")],
}.items():
    out = root / f"out_{name}"
    assert cli.main(["preprocess", *args, "--out", str(out), "--codecs", str(root / "codecs"), "--shard-size", "3",
                     "--no-progress"]) == 0
    samples = list(iter_samples(out))
    for s in samples:
        for member, entry in s["json"]["media"].items():
            codes = s[member]
            trace = traces[Path(entry["origin"].rpartition(":")[2]).stem]
            assert entry["modality"] == "toy" and entry["codec"] == "toy_scalar", entry
            assert (entry["num_codebooks"], entry["codebook_size"], entry["frame_rate"]) == (1, 16, 10.0), entry
            assert entry["seconds"] == len(trace) / 100 and entry["frames"] == len(trace) // 10, entry
            assert np.array_equal(codes, codec.encode([trace])[0])  # the pipeline's codes are the codec's
            back = codec.decode([codes])[0]
            assert back.shape == (codes.shape[1] * 10,)
            assert np.array_equal(codec.encode([back])[0], codes)  # decoded levels re-encode to the same codes
            frames = trace[: len(back)].reshape(-1, 10).mean(1)
            report.setdefault("errors", []).append(float(np.abs(back[::10] - frames).mean()))
    stats = json.loads((out / "stats.json").read_text())
    run = json.loads((out / "run.json").read_text())
    report[name] = {"keys": [s["__key__"] for s in samples], "skipped": stats["skipped_by_reason"],
                    "tokens": stats["tokens"], "media": stats["media"], "hours": stats["audio_hours"],
                    "frames": sum(e["frames"] for s in samples for e in s["json"]["media"].values()),
                    "codec_names": run["settings"]["codec_names"],
                    "parts": [c for s in samples if s["json"]["kind"] == "conversation"
                              for t in s["json"]["conversation"] for c in t["content"]]}
tiny = root / "out_tiny"
assert cli.main(["preprocess", "--source", "manifest", "--input", str(root / "manifest.jsonl"), "--out", str(tiny),
                 "--tiny", "--codec", "toy_scalar", "--no-progress"]) == 0
report["tiny"] = [s["toy.npy"].tolist() for s in iter_samples(tiny)]
report["tiny_expected"] = [registry.build_codec("toy", "tiny").encode([traces[k]])[0].tolist() for k in ("t0", "t1", "t2")]
print("REPORT " + json.dumps(report))
"""


def _toy_corpus(root: Path) -> None:
    """Traces t0..t3 (100 Hz), a manifest, a conversation file and a wds tar naming them; one broken trace."""
    rng = np.random.default_rng(0)
    (root / "traces").mkdir(parents=True)
    for i, n in enumerate((230, 400, 170, 300)):
        t = np.arange(n) / 100
        np.save(root / "traces" / f"t{i}.npy", (0.8 * np.sin(2 * np.pi * (0.5 + i) * t)
                                                + 0.05 * rng.standard_normal(n)).astype(np.float32))
    (root / "traces" / "bad.npy").write_bytes(b"not an npy file")
    rows = [{"id": f"r{i}", "text": f"trace number {i}", "toy": f"traces/t{i}.npy"} for i in range(3)]
    rows.append({"id": "broken", "text": "a bad trace", "toy": "traces/bad.npy"})
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    chat = {"id": "chat", "conversation": [
        {"role": "user", "content": [{"text": "What does this do?"}, {"toy": "traces/t3.npy"}]},
        {"role": "assistant", "message": "It rises, like this one:", "toy": "traces/t1.npy"}]}
    (root / "chat.jsonl").write_text(json.dumps(chat) + "\n")
    (root / "tars").mkdir()
    with tarfile.open(root / "tars" / "00000.tar", "w") as tf:
        for key, data in (("t0.npy", (root / "traces" / "t0.npy").read_bytes()), ("t0.txt", b"a toy trace"),
                          ("t2.npy", (root / "traces" / "t2.npy").read_bytes()), ("t2.txt", b"another one")):
            info = tarfile.TarInfo(key)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_toy_modality_column_preprocesses_and_its_codes_decode(tmp_path):
    """A manifest ``toy`` column, a conversation ``toy`` part and per-turn key, and ``.npy`` tar members
    (claimed by the toy plugin's suffixes) become toy samples coded by the fitted toy codec."""
    _toy_corpus(tmp_path)
    env = {**os.environ, registry.PLUGINS_ENV: str(TOY), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-c", TOY_SCRIPT, str(tmp_path)], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rep = json.loads(r.stdout.split("REPORT ", 1)[1])
    man = rep["manifest"]
    assert man["keys"] == ["r0", "r1", "r2"] and man["skipped"] == {"unreadable_media": 1}
    assert man["tokens"] == {"toy": man["frames"]} == {"toy": 23 + 40 + 17}  # 1 LM codebook, 10 frames/s
    assert man["media"] == {"toy": 3} and man["hours"]["toy"] == pytest.approx((2.3 + 4.0 + 1.7) / 3600, abs=1e-6)
    assert man["codec_names"]["toy"] == "toy_scalar" and man["codec_names"]["speech"] == "speechtokenizer"
    assert rep["conversations"]["keys"] == ["chat"]
    assert {"toy": "m0.toy.npy"} in rep["conversations"]["parts"] and {"toy": "m1.toy.npy"} in rep["conversations"]["parts"]
    assert rep["wds"]["keys"] == ["t0", "t2"] and rep["wds"]["media"] == {"toy": 2}
    assert max(rep["errors"]) < 0.15  # 16 fitted levels over [-0.85, 0.85]: decoded frames stay close
    assert rep["tiny"] == rep["tiny_expected"]  # --tiny --codec toy_scalar: the registry's tiny toy codec


# ------------------------------------------------------------------------------- --codec NAME
@pytest.fixture
def second_speech_codec(tmp_path, monkeypatch):
    """A second speech card (``speechtokenizer_b``, same implementation) in ``$ANYGPT_TOKENIZERS_DIR``."""
    from anygpt.modalities.cards import CARDS_ENV

    cards = tmp_path / "cards"
    cards.mkdir()
    text = Path(registry.codec_card("speech")["_path"]).read_text(encoding="utf-8")
    (cards / "speechtokenizer_b.yaml").write_text(text.replace("name: speechtokenizer", "name: speechtokenizer_b"))
    monkeypatch.setenv(CARDS_ENV, str(cards))
    assert "speechtokenizer_b" in registry.codec_names("speech")
    return "speechtokenizer_b"


@pytest.mark.parametrize("extra, message", [
    (["--tiny", "--codec", "nope"], "--codec: no registered modality has a codec named 'nope' (known: "
                                    "encodec_32khz, mimi, seed_tokenizer_2, speechtokenizer)"),
    (["--codecs", "{dir}", "--codec", "speechtokenizer"], "--codec: only with --tiny"),
    (["--codec", "speechtokenizer"], "--codec: only with --tiny"),
    (["--tiny", "--modality", "sensor"], "--modality: 'sensor' is not a registered modality (known: image, speech, music)"),
])
def test_codec_and_modality_flag_errors(tmp_path, extra, message):
    m = S.speech_image_manifest(tmp_path / "c", 2)
    out = tmp_path / "out"
    args = ["--source", "manifest", "--input", str(m), "--out", str(out), "--no-progress"]
    rc, err = _cli(args + [a.replace("{dir}", str(tmp_path)) for a in extra])
    lines = err.strip().splitlines()
    assert rc == 1 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert not out.exists()


def test_codec_flag_is_not_abbreviated(tmp_path, capsys):
    from data_pipeline.cli import main

    m = S.speech_image_manifest(tmp_path / "c", 2)
    with pytest.raises(SystemExit) as e:
        main(["--source", "manifest", "--input", str(m), "--out", str(tmp_path / "o"), "--tiny", "--code", "x"])
    assert e.value.code == 2 and "unrecognized arguments: --code" in capsys.readouterr().err


def test_two_codecs_for_one_modality_is_an_error(tmp_path, second_speech_codec):
    m = S.speech_image_manifest(tmp_path / "c", 2)
    rc, err = _cli(["--source", "manifest", "--input", str(m), "--out", str(tmp_path / "o"), "--tiny",
                    "--codec", "speechtokenizer", "--codec", second_speech_codec])
    assert rc == 1 and "--codec: speechtokenizer and speechtokenizer_b are both speech codecs" in err, err


def test_codec_flag_selects_the_codec_and_a_rerun_with_another_is_refused(tmp_path, second_speech_codec):
    corpus = S.manifest_corpus(tmp_path / "c", broken=False, n=1)
    out = tmp_path / "out"
    opts = _opts("manifest", corpus.input, out, codec_names=[second_speech_codec])
    # A codec given in-process must be the run's: the default speech codec is not speechtokenizer_b.
    with pytest.raises(registry.CodecError, match="the codec given is 'speechtokenizer', this run's is 'speechtokenizer_b'"):
        run_preprocess(opts, codecs={"speech": registry.build_codec("speech", "tiny")}, verbose=False)
    stats = run_preprocess(dataclasses.replace(opts, overwrite=True), verbose=False)
    assert stats["written"] == len(corpus.keys) == 3
    codec_of = {e["modality"]: e["codec"] for s in iter_samples(out) for e in s["json"]["media"].values()}
    assert codec_of == {"speech": "speechtokenizer_b", "image": "seed_tokenizer_2", "music": "encodec_32khz"}
    settings = json.loads((out / "run.json").read_text())["settings"]
    assert settings["codec_names"]["speech"] == "speechtokenizer_b"
    with pytest.raises(PreprocessError, match=r"codec_names: .*'speech': 'speechtokenizer_b'.* there, .*"
                                              r"'speech': 'speechtokenizer'.* now"):
        run_preprocess(dataclasses.replace(opts, codec_names=[]), verbose=False)


# -------------------------------------------------------------------- filters, suffixes, cards
def test_per_modality_limits_apply_to_their_modality_only(tmp_path):
    corpus = S.manifest_corpus(tmp_path / "c", broken=False)  # speech 0.6 s, music 0.5 s
    out = tmp_path / "out"
    opts = _opts("manifest", corpus.input, out)
    opts.filters.per_modality = {"music": Limits(max_seconds=0.3), "speech": Limits(clip_seconds=0.4)}
    stats = run_preprocess(opts, verbose=False)
    assert stats["skipped_by_reason"] == {"too_long": 1}
    samples = {s["__key__"]: s for s in iter_samples(out)}
    assert sorted(samples) == ["im0", "im1", "sp0", "sp1"]
    entry = samples["sp0"]["json"]["media"]["speech.npy"]
    assert entry["truncated"] is True and entry["seconds"] == 0.4 and samples["sp0"]["speech.npy"].shape == (8, 20)


def _wds(root: Path, members: dict[str, bytes]) -> Path:
    root.mkdir(parents=True)
    with tarfile.open(root / "00000.tar", "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return root


@pytest.mark.parametrize("modality, expected", [(None, "speech"), ("music", "music"), ("image", "speech")])
def test_wds_pairs_suffix_goes_to_the_modality_that_claims_it(tmp_path, modality, expected):
    wav = S.write_audio(tmp_path / "a.wav", 0.3).read_bytes()
    root = _wds(tmp_path / "tars", {"a.wav": wav, "a.txt": b"a sound",
                                    "b.jpg": S.image_bytes(fmt="JPEG"), "b.txt": b"a picture",
                                    "c.bin": b"?", "c.txt": b"nothing anyone claims"})
    items = list(build_reader(_opts("wds-pairs", root, tmp_path / "o", modality=modality)))
    assert [(i.id, i.modality, i.error and i.error[0]) for i in items] == [
        ("a", expected, None), ("b", "image", None), ("c", None, "no_media")]


class _ShortImage:
    """Wraps the tiny image codec: 31 codes instead of the card's ``tokens_per_item`` of 32."""

    def __init__(self, inner):
        self.inner, self.card = inner, inner.card
        self.num_codebooks, self.codebook_size = inner.num_codebooks, inner.codebook_size

    def eval(self):
        return self

    def encode(self, items):
        return [np.asarray(c)[:, :31] for c in self.inner.encode(items)]


def test_codes_are_checked_against_the_run_card_span_length(tmp_path):
    root = tmp_path / "c"
    S.write_image(root / "a.png")
    (root / "m.jsonl").write_text(json.dumps({"id": "a", "text": "a picture", "image": "a.png"}) + "\n")
    out = tmp_path / "out"
    stats = run_preprocess(_opts("manifest", root / "m.jsonl", out),
                           codecs={"image": _ShortImage(registry.build_codec("image", "tiny"))}, verbose=False)
    assert stats["skipped_by_reason"] == {"bad_code_shape": 1}
    err = json.loads((out / "errors.jsonl").read_text())
    assert err["detail"] == "image: 31 codes, expected exactly 32"
