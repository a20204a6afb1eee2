"""Preprocessing (data_pipeline): every reader on a fixture corpus with broken files, the accounting
identity, the sample schema, rank splits, resume, and SIGKILL-and-rerun equivalence in a real subprocess.

Fixture corpora come from :mod:`data_pipeline.synthetic` (generated in tmp dirs); codecs are the real
tiny codecs (``build_codec(m, "tiny")``), shared by all in-process runs through one codec cache; a
wrapper codec injects out-of-range codes and encoder failures.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from data_pipeline import synthetic as S
from data_pipeline.options import PreprocessError, PreprocessOptions
from data_pipeline.runner import owned_chunks, run_preprocess
from data_pipeline.shards import iter_samples, list_shards, sidecar_path

REPO = Path(__file__).resolve().parents[1]
ENTRY = REPO / "launch" / "preprocess.py"
REASONS = {"missing_file", "unreadable_media", "unreadable_archive", "bad_record", "bad_token_string", "empty_text",
           "text_too_short", "text_too_long", "text_filtered", "meta_filtered", "no_media", "too_short", "too_long",
           "image_too_small", "bad_aspect_ratio", "encode_error", "codes_out_of_range", "bad_code_shape", "duplicate_id"}


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def codecs():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the test machine's cores are shared; 1 thread is fastest and deterministic
    # A codec cache shared by the in-process runs: the real tiny codecs (build_codec(m, "tiny")) are
    # built on first use and kept here.
    yield {}
    torch.set_num_threads(threads)


def make_opts(corpus: S.Corpus, out: Path, **kw) -> PreprocessOptions:
    opts = PreprocessOptions(source=corpus.source, input=str(corpus.input), out=str(out), tiny=True, progress=False,
                             shard_size=3, batch_size=2)
    for key, value in corpus.options.items():
        section, name = key.split(".")
        setattr(getattr(opts, section), name, value)
    return dataclasses.replace(opts, **kw)


def keys_of(out: Path) -> list[str]:
    return [s["__key__"] for s in iter_samples(out)]


def check_accounting(out: Path, stats: dict, corpus: S.Corpus) -> None:
    """The identity, the expected reasons, errors.jsonl and stats.json agreeing with each other."""
    assert stats["inputs"] == stats["written"] + stats["skipped"] == corpus.inputs
    assert stats["skipped_by_reason"] == corpus.skips
    assert keys_of(out) == corpus.keys
    on_disk = json.loads((out / "stats.json").read_text())
    for k in ("inputs", "written", "skipped", "skipped_by_reason", "tokens", "audio_hours", "media"):
        assert on_disk[k] == stats[k], k
    assert on_disk["complete"] is True
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert len(errors) == stats["skipped"]
    assert {e["reason"] for e in errors} <= REASONS
    for e in errors:
        assert {"source", "key", "path", "reason", "detail", "index", "chunk"} <= set(e)
        assert e["source"] == corpus.source
    assert sorted(e["index"] for e in errors) == sorted(set(e["index"] for e in errors))


# ------------------------------------------------------------------------------------ readers
@pytest.mark.parametrize("fmt", ["jsonl", "csv", "tsv"])
def test_manifest_reader_accounting_and_schema(tmp_path, codecs, fmt):
    corpus = S.manifest_corpus(tmp_path / "c", fmt)
    out = tmp_path / "out"
    stats = run_preprocess(make_opts(corpus, out), codecs=codecs)
    check_accounting(out, stats, corpus)
    assert set(stats["skipped_by_reason"]) >= {"missing_file", "unreadable_media", "empty_text", "too_long",
                                               "no_media", "bad_record"}
    samples = {s["__key__"]: s for s in iter_samples(out)}
    sp, im, mu = samples["sp0"], samples["im0"], samples["mu0"]
    # Speech keeps all 8 RVQ layers, music 4 codebooks, image 1 x 32; codes are integers in range.
    assert sp["speech.npy"].shape[0] == 8 and sp["speech.npy"].shape[1] == 30  # 0.6 s at 50 Hz
    assert mu["music.npy"].shape == (4, 25)
    assert im["image.npy"].shape == (1, 32)
    for s, m, size in ((sp, "speech", 1024), (mu, "music", 2048), (im, "image", 8192)):
        arr = s[f"{m}.npy"]
        assert arr.dtype == np.int64 and arr.min() >= 0 and arr.max() < size
        j = s["json"]
        assert j["format"] == 1 and j["kind"] == "pair" and j["modality"] == m and j["source"] == "manifest"
        assert j["text"] and j["id"] == s["__key__"]
        info = j["media"][f"{m}.npy"]
        assert info["modality"] == m and info["codebook_size"] == size and info["frames"] == arr.shape[1]
        assert info["num_codebooks"] == arr.shape[0]
    assert sp["json"]["durations"] == {"speech.npy": 0.6}
    assert sp["json"]["media"]["speech.npy"]["sample_rate"] == 16000
    assert mu["json"]["media"]["music.npy"]["sample_rate"] == 32000  # 44.1 kHz stereo file resampled, down-mixed
    assert stats["tokens"]["speech"] == 2 * 30  # the LM sees layer 1 only
    assert stats["codes"]["speech"] == 8 * 2 * 30
    assert stats["tokens"]["music"] == 4 * 25 and stats["tokens"]["image"] == 2 * 32
    assert stats["media"] == {"image": 2, "music": 1, "speech": 2} and stats["audio_hours"]["speech"] == pytest.approx(1.2 / 3600, rel=1e-3)
    # Stored compactly (int16), read back as int64 by iter_samples.
    raw = next(iter_samples(out, decode=False))
    assert np.load(io.BytesIO(raw["speech.npy"])).dtype == np.int16


def test_webdataset_reads_shards(tmp_path, codecs):
    import webdataset as wds

    corpus = S.manifest_corpus(tmp_path / "c", broken=False)
    out = tmp_path / "out"
    run_preprocess(make_opts(corpus, out), codecs=codecs)
    urls = [str(p) for p in list_shards(out)]
    assert urls and all(Path(u).name.startswith("shard-") for u in urls)
    got = list(wds.WebDataset(urls, shardshuffle=False).decode())
    assert [s["__key__"] for s in got] == corpus.keys
    assert got[0]["speech.npy"].shape == (8, 30) and got[0]["json"]["text"] == "spoken words 0"


def test_shards_open_with_a_header_counting_their_samples(tmp_path, codecs):
    """Every shard's first member is ``__shard__`` declaring exactly the samples written into it (skipped
    inputs leave none), also for spill-over parts; WebDataset still reads the shards."""
    import tarfile

    import webdataset as wds

    from anygpt.data.schema import HEADER_MEMBER, read_header

    corpus = S.manifest_corpus(tmp_path / "c")  # broken inputs: chunks hold fewer samples than inputs
    out = tmp_path / "out"
    stats = run_preprocess(make_opts(corpus, out, shard_size=4, shard_bytes=2048), codecs=codecs)
    total = 0
    for part in stats["shards"]:
        with tarfile.open(out / part["name"]) as tf:
            members = tf.getmembers()
            assert members[0].name == HEADER_MEMBER, part
            declared = read_header(tf.extractfile(members[0]).read(), part["name"])
        keys = {m.name.split(".")[0] for m in members[1:]}
        assert declared == part["samples"] == len(keys), part
        total += declared
    assert total == stats["written"] == len(corpus.keys)
    assert any(p["name"].endswith("-1.tar") for p in stats["shards"])  # a spill-over part has its own header
    urls = [str(p) for p in list_shards(out)]
    assert [s["__key__"] for s in wds.WebDataset(urls, shardshuffle=False)] == corpus.keys


def test_librispeech_layout(tmp_path, codecs):
    corpus = S.librispeech_corpus(tmp_path / "LibriSpeech")
    out = tmp_path / "out"
    stats = run_preprocess(make_opts(corpus, out), codecs=codecs)
    check_accounting(out, stats, corpus)
    s = next(iter_samples(out))
    assert s["json"]["text"] == "THE WORDS OF UTTERANCE 0"
    assert s["json"]["meta"] == {"speaker": "19", "chapter": "198", "layout": "librispeech"}


def test_mls_layout(tmp_path, codecs):
    corpus = S.mls_corpus(tmp_path / "mls_english")
    out = tmp_path / "out"
    stats = run_preprocess(make_opts(corpus, out), codecs=codecs)
    check_accounting(out, stats, corpus)
    s = next(iter_samples(out))
    assert s["json"]["meta"]["layout"] == "mls" and s["json"]["meta"]["book"] == "10003"


def test_commonvoice_tsv(tmp_path, codecs):
    corpus = S.commonvoice_corpus(tmp_path / "en")
    out = tmp_path / "out"
    stats = run_preprocess(make_opts(corpus, out), codecs=codecs)
    check_accounting(out, stats, corpus)
    first = next(iter_samples(out))
    assert first["json"]["text"] == 'He said "hello" and left.'  # TSV quotes are text, not quoting
    assert first["json"]["meta"]["up_votes"] == 2 and first["json"]["meta"]["locale"] == "en"
    assert first["json"]["media"]["speech.npy"]["sample_rate"] == 16000  # 48 kHz mp3 resampled


def test_wds_pairs_img2dataset_tars(tmp_path, codecs):
    corpus = S.wds_pairs_corpus(tmp_path / "laion")
    out = tmp_path / "out"
    stats = run_preprocess(make_opts(corpus, out), codecs=codecs)
    check_accounting(out, stats, corpus)
    samples = {s["__key__"]: s for s in iter_samples(out)}
    assert samples["000000001"]["json"]["text"] == "caption in json 1"  # no .txt: falls back to the json caption
    assert samples["000000000"]["json"]["meta"]["url"] == "http://example.com/0.jpg"
    assert samples["000000000"]["json"]["media"]["image.npy"]["origin"].endswith("00000.tar:000000000.jpg")


def test_wds_pairs_truncated_tar_keeps_identity(tmp_path, codecs):
    src = S.wds_pairs_corpus(tmp_path / "c")
    data = (src.input / "00000.tar").read_bytes()
    (src.input / "00001.tar").unlink()
    (src.input / "00000.tar").write_bytes(data[: len(data) // 2 + 700])
    out = tmp_path / "out"
    stats = run_preprocess(make_opts(src, out), codecs=codecs)
    assert stats["inputs"] == stats["written"] + stats["skipped"] > 0
    assert 0 < stats["written"] < len(src.keys) + 1


def test_anygpt_jsonl_needs_no_codec(tmp_path):
    corpus = S.anygpt_jsonl_corpus(tmp_path / "c")
    out = tmp_path / "out"
    opts = make_opts(corpus, out, tiny=False)
    stats = run_preprocess(opts)  # no codecs at all
    check_accounting(out, stats, corpus)
    s = {x["__key__"]: x for x in iter_samples(out)}
    assert s["pair-image"]["image.npy"].shape == (1, 32)
    assert s["pair-image"]["image.npy"][0, :3].tolist() == [0, 37, 74]
    assert s["pair-speech"]["speech.npy"].shape == (1, 20)  # token strings carry layer 1 only
    assert s["pair-speech"]["json"]["durations"] == {"speech.npy": 0.4}
    mu = s["pair-music"]["music.npy"]
    assert mu.shape == (4, 3) and mu[:, 0].tolist() == [0, 5, 10, 15]  # frame-major: codebook k = id // 2048
    conv = s["sft-0"]["json"]
    assert conv["kind"] == "conversation"
    assert conv["conversation"][0] == {"role": "user", "content": [{"text": "Say this: "}, {"speech": "m0.speech.npy"}]}
    parts = conv["conversation"][1]["content"]
    assert parts[0] == {"marker": "<-Ins->"} and {"marker": "<-Res->"} in parts and parts[-1] == {"speech": "m1.speech.npy"}
    assert s["sft-0"]["m0.speech.npy"].shape == (1, 20)


def test_conversations_with_media_files(tmp_path, codecs):
    corpus = S.conversations_corpus(tmp_path / "c")
    out = tmp_path / "out"
    stats = run_preprocess(make_opts(corpus, out), codecs=codecs)
    check_accounting(out, stats, corpus)
    s = {x["__key__"]: x for x in iter_samples(out)}
    c0 = s["chat-0"]
    assert sorted(k for k in c0 if k.endswith(".npy")) == ["m0.speech.npy", "m1.image.npy", "m2.speech.npy"]
    turns = c0["json"]["conversation"]
    assert turns[0]["content"] == [{"speech": "m0.speech.npy"}, {"text": "What is in this picture?"},
                                   {"image": "m1.image.npy"}]
    assert turns[1]["content"][0] == {"marker": "<-Ins->"} and turns[1]["content"][-1] == {"speech": "m2.speech.npy"}
    assert c0["m0.speech.npy"].shape == (8, 35) and c0["m1.image.npy"].shape == (1, 32)
    assert c0["m2.speech.npy"].shape == (8, 30)  # 24 kHz file resampled to 16 kHz
    c1 = s["chat-1"]["json"]
    assert c1["system"] == "You are a music assistant."
    assert c1["conversation"][1]["content"] == [{"text": "Here it is:"}, {"music": "m0.music.npy"}]
    assert set(c1["durations"]) == {"m0.music.npy"}


# ------------------------------------------------------------------------ codes, encode errors
class _Faulty:
    """Wraps a codec: out-of-range codes for one input, an exception for another."""

    def __init__(self, inner):
        self.inner, self.card = inner, inner.card
        self.sample_rate, self.frame_rate = inner.sample_rate, inner.frame_rate
        self.num_codebooks, self.codebook_size = inner.num_codebooks, inner.codebook_size

    def eval(self):
        return self

    def encode(self, items):
        out = []
        for x in items:
            if len(x) == 8000:  # the 0.5 s clip: codec blows up
                raise RuntimeError("boom")
            codes = np.asarray(self.inner.encode([x])[0]).copy()
            if len(x) == 12800:  # the 0.8 s clip: codes out of range
                codes[0, 0] = self.codebook_size + 5
            out.append(codes)
        return out


def test_codes_out_of_range_and_encode_errors_are_skipped(tmp_path, codecs):
    from anygpt.modalities import build_codec

    inner = codecs.get("speech") or build_codec("speech", "tiny")
    root = tmp_path / "c"
    rows = []
    for i, sec in enumerate((0.6, 0.5, 0.8, 0.7)):
        S.write_audio(root / f"a{i}.wav", sec, 16000, i)
        rows.append({"id": f"u{i}", "text": "words", "speech": f"a{i}.wav"})
    (root / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    corpus = S.Corpus("manifest", root / "m.jsonl", ["u0", "u3"], {"encode_error": 1, "codes_out_of_range": 1})
    out = tmp_path / "out"
    stats = run_preprocess(make_opts(corpus, out, batch_size=4, shard_size=10), codecs={"speech": _Faulty(inner)})
    check_accounting(out, stats, corpus)


def test_duplicate_ids_within_a_chunk(tmp_path, codecs):
    root = tmp_path / "c"
    S.write_image(root / "a.png")
    rows = [{"id": "same.id", "text": "one", "image": "a.png"}, {"id": "same/id", "text": "two", "image": "a.png"}]
    (root / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    corpus = S.Corpus("manifest", root / "m.jsonl", ["same_id"], {"duplicate_id": 1})
    out = tmp_path / "out"
    check_accounting(out, run_preprocess(make_opts(corpus, out), codecs=codecs), corpus)


# ---------------------------------------------------------------------- sharding, ranks, resume
def test_plan_chunking_and_rank_ownership_are_a_partition(tmp_path):
    from data_pipeline.plan import write_plan
    from data_pipeline.readers import InputItem

    items = [InputItem(f"id{i}", "pair", f"row {i}", text=f"text {i}") for i in range(23)]
    opts = PreprocessOptions(source="manifest", input=str(tmp_path), out=str(tmp_path), tiny=True, shard_size=5)
    plan = write_plan(tmp_path, opts, items, world=1)
    chunks = list(plan.iter_chunks(range(plan.chunks_total)))
    assert [c for c, _, _ in chunks] == [0, 1, 2, 3, 4] and [f for _, f, _ in chunks] == [0, 5, 10, 15, 20]
    assert [x for _, _, its in chunks for x in its] == items
    assert [plan.chunk_inputs(c) for c in range(5)] == [5, 5, 5, 5, 3]
    for world in (1, 2, 3, 7):
        owned = [c for r in range(world) for c in owned_chunks(5, r, world)]
        assert sorted(owned) == list(range(5))


def test_rank_splits_cover_every_input_once(tmp_path, codecs):
    corpus = S.manifest_corpus(tmp_path / "c")
    single = tmp_path / "single"
    ref = run_preprocess(make_opts(corpus, single, shard_size=2), codecs=codecs)
    multi = tmp_path / "multi"
    per_rank = []
    for rank in range(3):
        st = run_preprocess(make_opts(corpus, multi, shard_size=2, rank=rank, world_size=3), codecs=codecs)
        per_rank.append(st["this_rank"])
    # Each rank wrote only its own chunks; together: every input exactly once, same bytes as one rank.
    assert sum(r["inputs_processed"] for r in per_rank) == corpus.inputs
    n = ref["chunks_total"]
    assert sorted(c for r in range(3) for c in owned_chunks(n, r, 3)) == list(range(n))
    assert sum(r["chunks"] for r in per_rank) == n
    assert keys_of(multi) == keys_of(single) == corpus.keys
    a = list(iter_samples(single, decode=False))
    b = list(iter_samples(multi, decode=False))
    assert [{k: v for k, v in s.items() if k != "__url__"} for s in a] == \
           [{k: v for k, v in s.items() if k != "__url__"} for s in b]
    final = json.loads((multi / "stats.json").read_text())
    assert final["complete"] and final["inputs"] == ref["inputs"] and final["skipped_by_reason"] == ref["skipped_by_reason"]


def test_rank_from_environment(tmp_path, codecs, monkeypatch):
    corpus = S.manifest_corpus(tmp_path / "c", broken=False)
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    st = run_preprocess(make_opts(corpus, tmp_path / "o", shard_size=2), codecs=codecs)
    assert (st["this_rank"]["rank"], st["this_rank"]["world_size"]) == (1, 2)
    assert [p.name for p in list_shards(tmp_path / "o")] == ["shard-000001.tar"]


def test_resume_skips_finished_and_redoes_unfinished(tmp_path, codecs):
    corpus = S.manifest_corpus(tmp_path / "c")
    out = tmp_path / "out"
    opts = make_opts(corpus, out, shard_size=3)
    first = run_preprocess(opts, codecs=codecs)
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("*.tar")}
    # Simulate a crash inside chunk 1: sidecar gone, shard half-written under its temporary name.
    sidecar_path(out, "shard", 1).unlink()
    (out / "shard-000001.tar").rename(out / "shard-000001.tar.tmp-99999")
    (out / "shard-000001.tar.tmp-99999").write_bytes(b"partial")
    second = run_preprocess(opts, codecs=codecs)
    assert second["this_rank"]["chunks_skipped"] == first["this_rank"]["chunks"] - 1
    assert second["this_rank"]["inputs_processed"] == 3
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("*.tar")}
    assert not list(out.glob("*.tmp-*"))
    assert set(after) == set(before)
    for name in before:
        assert after[name][1] == before[name][1]  # byte-identical, redone or not
        if name != "shard-000001.tar":
            assert after[name][0] == before[name][0]  # finished shards untouched
    for k in ("inputs", "written", "skipped", "skipped_by_reason", "tokens"):
        assert second[k] == first[k]


def test_shard_bytes_spills_into_parts(tmp_path, codecs):
    corpus = S.manifest_corpus(tmp_path / "c", broken=False, n=3)
    out = tmp_path / "out"
    stats = run_preprocess(make_opts(corpus, out, shard_size=7, shard_bytes=4096), codecs=codecs)
    names = [p.name for p in list_shards(out)]
    assert names[0] == "shard-000000.tar" and "shard-000000-1.tar" in names
    assert all((out / n).stat().st_size <= 4096 + 10240 for n in names)  # + tar end-of-archive padding
    assert keys_of(out) == corpus.keys and stats["written"] == len(corpus.keys)
    assert sum(s["samples"] for s in stats["shards"]) == stats["written"]


# ------------------------------------------------------------------------ validation, CLI
def _cli(args: list[str]) -> tuple[int, str]:
    import contextlib

    from data_pipeline.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(args)
    return rc, err.getvalue()


@pytest.mark.parametrize("args, message", [
    (["--source", "manifest", "--input", "NOPE.jsonl", "--tiny"], "--input: NOPE.jsonl does not exist"),
    (["--source", "manifest", "--input", "{m}"], "give --codecs DIR or --tiny"),
    (["--source", "manifest", "--input", "{m}", "--tiny", "--rank", "3", "--world-size", "2"], "--rank: 3 is outside"),
    (["--source", "manifest", "--input", "{m}", "--tiny", "--rank", "1"], "--rank and --world-size go together"),
    (["--source", "manifest", "--input", "{m}", "--codecs", "NOPE"], "--codecs: NOPE is not a directory"),
    (["--source", "manifest", "--input", "{m}", "--tiny", "--min-seconds", "5", "--max-seconds", "2"], "min_seconds 5.0 > max_seconds"),
    (["--source", "librispeech", "--input", "{m}", "--tiny"], "takes a corpus directory"),
    (["--source", "manifest", "--input", "{m}", "--tiny", "--prefix", "a-b"], "--prefix"),
    (["--input", "{m}", "--tiny"], "--source: required"),
    (["--recipe", "no_such_recipe", "--input", "{m}", "--tiny"], "neither a file nor a shipped recipe"),
])
def test_invalid_arguments_fail_before_any_work(tmp_path, args, message):
    m = S.speech_image_manifest(tmp_path / "c", 2)
    out = tmp_path / "out"
    rc, err = _cli([a.replace("{m}", str(m)) for a in args] + ["--out", str(out), "--no-progress"])
    assert rc == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert not out.exists()


def test_rerun_with_other_settings_is_refused(tmp_path, codecs):
    corpus = S.manifest_corpus(tmp_path / "c", broken=False)
    out = tmp_path / "out"
    run_preprocess(make_opts(corpus, out, shard_size=2), codecs=codecs)
    with pytest.raises(PreprocessError, match="shard_size"):
        run_preprocess(make_opts(corpus, out, shard_size=3), codecs=codecs)
    # --overwrite starts over.
    st = run_preprocess(make_opts(corpus, out, shard_size=3, overwrite=True), codecs=codecs)
    assert st["chunks_total"] == 2 and len(list(out.glob("*.tar"))) == 2


def test_cli_registers_preprocess_subcommand(tmp_path):
    from anygpt import cli

    parser = cli.build_parser(cli.SUBCOMMANDS + (["data_pipeline.cli:add_preprocess_parser"]
                                                if "data_pipeline.cli:add_preprocess_parser" not in cli.SUBCOMMANDS else []))
    m = S.speech_image_manifest(tmp_path / "c", 2)
    args = parser.parse_args(["preprocess", "--source", "manifest", "--input", str(m), "--out", str(tmp_path / "o"),
                              "--tiny", "--workers", "1", "--shard-size", "5", "--max-seconds", "9"])
    from data_pipeline.cli import options_from_args

    opts = options_from_args(args)
    assert (opts.source, opts.shard_size, opts.filters.max_seconds, opts.tiny) == ("manifest", 5, 9.0, True)
    assert callable(args.handler)


# ------------------------------------------------------------------ processes: pool and SIGKILL
def _env(**extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update(extra)
    return env


def _samples_bytes(out: Path) -> list[dict]:
    return [{k: v for k, v in s.items() if k != "__url__"} for s in iter_samples(out, decode=False)]


def _kill_corpus(root: Path) -> Path:
    m = S.speech_image_manifest(root, 12, seconds=0.5)
    with open(m, "a") as fh:  # a broken input too, so skip accounting is part of the comparison
        fh.write(json.dumps({"id": "broken", "text": "x", "image": "img/nope.png"}) + "\n")
    return m


@pytest.mark.slow
def test_sigkill_mid_run_and_rerun_equals_uninterrupted_run(tmp_path):
    manifest = _kill_corpus(tmp_path / "c")
    common = [sys.executable, str(ENTRY), "--source", "manifest", "--input", str(manifest), "--tiny",
              "--shard-size", "2", "--batch-size", "1", "--no-progress"]
    ref = tmp_path / "ref"
    subprocess.run(common + ["--out", str(ref)], env=_env(), check=True, capture_output=True, timeout=300)

    out = tmp_path / "killed"
    proc = subprocess.Popen(common + ["--out", str(out)], env=_env(DATA_PIPELINE_TEST_DELAY="0.4"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while not sidecar_path(out, "shard", 0).exists():
        assert proc.poll() is None, "the run finished or failed before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    time.sleep(0.5)  # let it get into the next chunk
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    done = [sidecar_path(out, "shard", c).exists() for c in range(7)]
    assert done[0] and not all(done), "the kill must land mid-run"
    assert not (out / "stats.json").exists()

    rerun = subprocess.run(common + ["--out", str(out)], env=_env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    resumed = re.search(r"(\d+) already done", rerun.stderr)
    assert resumed and int(resumed.group(1)) >= 1, rerun.stderr  # finished chunks were kept, not redone
    assert not list(out.glob("*.tmp-*"))
    assert _samples_bytes(out) == _samples_bytes(ref)  # same keys, same json and npy bytes, same order
    a, b = json.loads((ref / "stats.json").read_text()), json.loads((out / "stats.json").read_text())
    for k in ("inputs", "written", "skipped", "skipped_by_reason", "tokens", "codes", "shards"):
        assert a[k] == b[k], k
    assert (ref / "errors.jsonl").read_text() == (out / "errors.jsonl").read_text()
    assert a["inputs"] == a["written"] + a["skipped"] == 13


@pytest.mark.slow
def test_worker_pool_matches_single_process(tmp_path, codecs, capsys):
    manifest = _kill_corpus(tmp_path / "c")
    base = PreprocessOptions(source="manifest", input=str(manifest), tiny=True, shard_size=3, progress=False)
    one = run_preprocess(dataclasses.replace(base, out=str(tmp_path / "one")), codecs=codecs)
    two = run_preprocess(dataclasses.replace(base, out=str(tmp_path / "two"), workers=2))  # spawned workers
    assert "2 worker(s)" in capsys.readouterr().err
    assert two["this_rank"]["written"] == one["written"] == 12
    assert _samples_bytes(tmp_path / "one") == _samples_bytes(tmp_path / "two")
    assert (tmp_path / "one" / "errors.jsonl").read_text() == (tmp_path / "two" / "errors.jsonl").read_text()


def test_codecs_directory_matches_tiny_and_is_checked_before_work(tmp_path, codecs):
    from anygpt.modalities import build_codec

    cdir = tmp_path / "codecs"
    for m in ("speech", "image"):
        build_codec(m, "tiny").save(cdir / m)
    manifest = S.speech_image_manifest(tmp_path / "c", 4)
    base = PreprocessOptions(source="manifest", input=str(manifest), progress=False)
    run_preprocess(dataclasses.replace(base, out=str(tmp_path / "dir"), codecs=str(cdir)), verbose=False)
    run_preprocess(dataclasses.replace(base, out=str(tmp_path / "tiny"), tiny=True), verbose=False)
    assert _samples_bytes(tmp_path / "dir") == _samples_bytes(tmp_path / "tiny")
    # A codec directory without its checkpoint files fails with one line, before OUT exists.
    (cdir / "speech" / "SpeechTokenizer.pt").unlink()
    out = tmp_path / "never"
    rc, err = _cli(["--source", "manifest", "--input", str(manifest), "--out", str(out), "--codecs", str(cdir)])
    assert rc == 1 and err.count("\n") == 1 and "--codecs: speech:" in err, err
    assert not out.exists()
