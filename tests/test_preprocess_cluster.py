"""Preprocessing on clusters: rank resolution (SLURM arrays), the plan written once, ``--status`` and
resubmitting only the missing ranks, per-phase timings, the benchmark's mechanics, the SLURM example.

Processes are real where the claim is about processes: two array tasks started together on one
output, and a task killed with SIGKILL mid-run, then listed by ``--status`` and rerun alone.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_pipeline import plan as plan_mod
from data_pipeline import synthetic as S
from data_pipeline.options import PreprocessError, PreprocessOptions, resolve_rank
from data_pipeline.plan import PLAN_FILE, Plan, item_from_json, item_to_json
from data_pipeline.readers import build_reader
from data_pipeline.runner import compress_ranks, run_preprocess
from data_pipeline.shards import iter_samples, list_shards, sidecar_path

REPO = Path(__file__).resolve().parents[1]
ENTRY = REPO / "launch" / "preprocess.py"


@pytest.fixture(scope="module")
def codecs():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield {}
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def no_rank_env(monkeypatch):
    # The tests set the scheduler's variables themselves; a CI job running under SLURM must not leak in.
    for k in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN",
              "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_STEP"):
        monkeypatch.delenv(k, raising=False)


def _opts(manifest: Path, out: Path, **kw) -> PreprocessOptions:
    base = PreprocessOptions(source="manifest", input=str(manifest), out=str(out), tiny=True, progress=False,
                             shard_size=2, batch_size=2)
    return dataclasses.replace(base, **kw)


def _samples(out: Path) -> list[dict]:
    return [{k: v for k, v in s.items() if k != "__url__"} for s in iter_samples(out, decode=False)]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in ("RANK", "WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update(extra)
    return env


def _cli(args: list[str]) -> tuple[int, str, str]:
    """The top-level ``anygpt`` console entry (its exit code is the handler's)."""
    from anygpt import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(args)
    return rc, out.getvalue(), err.getvalue()


# ------------------------------------------------------------------------------ rank resolution
ARRAY = {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "4", "SLURM_ARRAY_TASK_COUNT": "3",
         "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}


@pytest.mark.parametrize("rank, world, env, expected", [
    (None, None, {}, (0, 1, "default")),
    (2, 4, {"RANK": "1", "WORLD_SIZE": "2", **ARRAY}, (2, 4, "--rank/--world-size")),
    (None, None, {"RANK": "1", "WORLD_SIZE": "2", **ARRAY}, (1, 2, "RANK/WORLD_SIZE")),
    (None, None, {"SLURM_PROCID": "3", "SLURM_NTASKS": "4"}, (3, 4, "SLURM_PROCID/SLURM_NTASKS")),
    # An array task: element id - min of count (every element sees SLURM_PROCID=0, SLURM_NTASKS=1).
    (None, None, ARRAY, (1, 3, "SLURM array task")),
    (None, None, {**ARRAY, "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "2"},
     (0, 2, "SLURM array task")),
    # Multi-task array elements: element * ntasks + procid of count * ntasks.
    (None, None, {**ARRAY, "SLURM_PROCID": "1", "SLURM_NTASKS": "2"}, (3, 6, "SLURM array task")),
    # --array=0-30:10: ids 0, 10, 20, 30 are elements 0..3.
    (None, None, {"SLURM_ARRAY_TASK_ID": "20", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_COUNT": "4",
                  "SLURM_ARRAY_TASK_STEP": "10"}, (2, 4, "SLURM array task")),
    # A resubmission of chosen ranks (--array=1,3 --world-size 4): the array ids are the ranks.
    (None, 4, {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_COUNT": "2"},
     (3, 4, "SLURM array id (--world-size given)")),
])
def test_rank_resolution_order(rank, world, env, expected):
    assert resolve_rank(rank, world, env) == expected


@pytest.mark.parametrize("rank, world, env, message", [
    (1, None, {}, "--rank and --world-size go together"),
    (None, 2, {}, "--rank and --world-size go together"),
    (None, None, {"RANK": "x", "WORLD_SIZE": "2"}, "RANK: not an integer ('x')"),
    (None, 2, {"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "1"}, "--rank: 2 is outside [0, 2)"),
    # --array=1,3 without --world-size: id 3 - min 1 is not an element of 2.
    (None, None, {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_COUNT": "2"},
     "pass --world-size"),
])
def test_rank_resolution_errors_are_one_line(rank, world, env, message):
    with pytest.raises(PreprocessError, match=None) as e:
        resolve_rank(rank, world, env)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_array_tasks_in_process_split_the_chunks(tmp_path, codecs, monkeypatch):
    manifest = S.speech_image_manifest(tmp_path / "c", 6, seconds=0.3)
    ref = run_preprocess(_opts(manifest, tmp_path / "ref"), codecs=codecs, verbose=False)
    out = tmp_path / "array"
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "0")
    mine = []
    for task in ("0", "1"):
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", task)
        st = run_preprocess(_opts(manifest, out), codecs=codecs, verbose=False)
        mine.append((st["this_rank"]["rank"], st["this_rank"]["world_size"], st["this_rank"]["chunks"]))
    assert mine == [(0, 2, 2), (1, 2, 1)]
    assert _samples(out) == _samples(tmp_path / "ref") and ref["written"] == 6


# ------------------------------------------------------------------------------ the plan
@pytest.mark.parametrize("build", [S.manifest_corpus, S.librispeech_corpus, S.mls_corpus, S.commonvoice_corpus,
                                   S.wds_pairs_corpus, S.conversations_corpus, S.anygpt_jsonl_corpus])
def test_plan_lines_round_trip_every_reader(tmp_path, build):
    corpus = build(tmp_path / "c")
    opts = PreprocessOptions(source=corpus.source, input=str(corpus.input), out=str(tmp_path / "o"), tiny=True)
    for key, value in corpus.options.items():
        section, name = key.split(".")
        setattr(getattr(opts, section), name, value)
    items = list(build_reader(opts))
    assert items
    assert [item_from_json(json.loads(json.dumps(item_to_json(i)))) for i in items] == items


def test_plan_is_written_once_and_later_ranks_do_not_rescan(tmp_path, codecs, monkeypatch, capsys):
    manifest = S.speech_image_manifest(tmp_path / "c", 6, seconds=0.3)
    out = tmp_path / "out"
    run_preprocess(_opts(manifest, out, rank=0, world_size=3), codecs=codecs)
    assert "plan: wrote" in capsys.readouterr().err
    plan = Plan.load(out)
    assert (plan.inputs_total, plan.chunks_total, plan.world_size) == (6, 3, 3)
    assert plan.settings == json.loads((out / "run.json").read_text())["settings"]
    assert plan.modalities == {"image": 3, "speech": 3}
    assert [i.id for i in plan.chunk_items(1)[1]] == ["s00002", "i00003"] and plan.chunk_items(1)[0] == 2

    def no_scan(opts):
        raise AssertionError("a later rank scanned the corpus again")

    monkeypatch.setattr("data_pipeline.runner.build_reader", no_scan)
    for rank in (1, 2):
        st = run_preprocess(_opts(manifest, out, rank=rank, world_size=3), codecs=codecs)
        assert st["this_rank"]["chunks"] == 1
    assert "plan: wrote" not in capsys.readouterr().err
    assert json.loads((out / "stats.json").read_text())["complete"]


def test_a_plan_with_other_settings_is_refused(tmp_path, codecs):
    manifest = S.speech_image_manifest(tmp_path / "c", 4, seconds=0.3)
    out = tmp_path / "out"
    run_preprocess(_opts(manifest, out), codecs=codecs, verbose=False)
    (out / "run.json").unlink()  # only the plan is left to notice
    with pytest.raises(PreprocessError) as e:
        run_preprocess(_opts(manifest, out, batch_size=1), codecs=codecs, verbose=False)
    msg = str(e.value)
    assert "\n" not in msg and PLAN_FILE in msg and "batch_size: 2 there, 1 now" in msg


def test_an_abandoned_plan_lock_is_taken_over(tmp_path, codecs, monkeypatch, capsys):
    manifest = S.speech_image_manifest(tmp_path / "c", 4, seconds=0.3)
    out = tmp_path / "out"
    out.mkdir()
    (out / plan_mod.LOCK_FILE).write_text("otherhost-12345-1\n")  # a planner that died: no heartbeat
    monkeypatch.setattr(plan_mod, "LOCK_STALE_S", 0.5)
    st = run_preprocess(_opts(manifest, out), codecs=codecs)
    err = capsys.readouterr().err
    assert "holder otherhost-12345-1 gone); taking over" in err and "plan: wrote" in err
    assert st["complete"] and not (out / plan_mod.LOCK_FILE).exists()
    assert not [p.name for p in out.iterdir() if ".tmp-" in p.name or ".stale-" in p.name]


def test_a_failed_preflight_leaves_no_plan_and_no_out(tmp_path):
    manifest = S.speech_image_manifest(tmp_path / "c", 2)
    out = tmp_path / "never"
    (tmp_path / "codecs").mkdir()  # no speech/ or image/ inside
    with pytest.raises(PreprocessError, match="has no 'image/' codec directory"):
        run_preprocess(_opts(manifest, out, tiny=False, codecs=str(tmp_path / "codecs")), verbose=False)
    assert not out.exists()


def test_sidecars_and_stats_time_each_phase(tmp_path, codecs):
    manifest = S.speech_image_manifest(tmp_path / "c", 4, seconds=0.3)
    out = tmp_path / "out"
    stats = run_preprocess(_opts(manifest, out), codecs=codecs, verbose=False)
    rec = json.loads(sidecar_path(out, "shard", 0).read_text())
    t = rec["timings"]
    assert set(t) == {"started", "ended", "read_s", "encode_s", "write_s"}
    assert t["ended"] >= t["started"] and t["encode_s"] > 0 and t["read_s"] > 0 and t["write_s"] > 0
    assert t["read_s"] + t["encode_s"] + t["write_s"] <= rec["elapsed_s"] + 1e-3
    assert set(stats["timings"]) == {"read_s", "encode_s", "write_s", "chunk_s"} and stats["timings"]["encode_s"] > 0


# ------------------------------------------------------------------------------ --status
def test_compress_ranks_into_an_array_expression():
    assert compress_ranks([0, 1, 2, 3, 7, 9, 10]) == "0-3,7,9-10"
    assert compress_ranks([5]) == "5" and compress_ranks([3, 1, 2, 1]) == "1-3" and compress_ranks([]) == ""


def test_status_reports_pending_ranks_and_exit_codes(tmp_path, codecs):
    manifest = S.speech_image_manifest(tmp_path / "c", 10, seconds=0.3)
    out = tmp_path / "out"
    rc, text, _ = _cli(["preprocess", "--out", str(out), "--status", "--world-size", "4"])
    assert rc == 3 and "no plan yet" in text and "--array=0-3" in text
    for rank in (0, 2):
        run_preprocess(_opts(manifest, out, rank=rank, world_size=4), codecs=codecs, verbose=False)
    before = sorted(p.name for p in out.rglob("*"))
    rc, text, _ = _cli(["preprocess", "--out", str(out), "--status"])  # world size from the plan
    assert rc == 3, text
    assert "world size 4 (from the plan)" in text and "pending ranks: --array=1,3 " in text
    lines = {int(ln.split()[0]): ln.split() for ln in text.splitlines() if ln.strip()[:1].isdigit()}
    assert lines[0][:3] == ["0", "2", "0"] and lines[1][:4] == ["1", "0", "1", "1"] and lines[3][:4] == ["3", "0", "1", "3"]
    assert "samples: 6 written, 0 skipped so far (6/10 inputs)" in text
    rc, text, _ = _cli(["preprocess", "--out", str(out), "--status", "--world-size", "2"])
    assert rc == 3 and "pending ranks: --array=1 " in text  # chunks 1 and 3 are both rank 1's of 2
    assert sorted(p.name for p in out.rglob("*")) == before  # --status did no work
    for rank in (1, 3):
        run_preprocess(_opts(manifest, out, rank=rank, world_size=4), codecs=codecs, verbose=False)
    rc, text, _ = _cli(["preprocess", "--out", str(out), "--status"])
    assert rc == 0 and "complete: nothing to resubmit" in text and "5/5 done" in text


def test_engine_ray_without_ray_is_one_line_before_any_work(tmp_path, monkeypatch):
    manifest = S.speech_image_manifest(tmp_path / "c", 2)
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the extra were not installed
    out = tmp_path / "out"
    rc, _, err = _cli(["preprocess", "--source", "manifest", "--input", str(manifest), "--out", str(out), "--tiny",
                       "--engine", "ray"])
    assert rc == 1 and err.count("\n") == 1 and "pip install 'anygpt-trainer[ray]'" in err, err
    assert not out.exists()


# ------------------------------------------------------------------------------ real processes
def _corpus(root: Path, n: int = 12) -> Path:
    m = S.speech_image_manifest(root, n, seconds=0.3)
    with open(m, "a") as fh:
        fh.write(json.dumps({"id": "broken", "text": "x", "image": "img/nope.png"}) + "\n")
    return m


def _common(manifest: Path, out: Path) -> list[str]:
    return [sys.executable, str(ENTRY), "--source", "manifest", "--input", str(manifest), "--out", str(out),
            "--tiny", "--shard-size", "2", "--batch-size", "1", "--no-progress"]


@pytest.mark.slow
def test_two_array_tasks_started_together_equal_a_single_process_run(tmp_path, codecs):
    manifest = _corpus(tmp_path / "c")
    run_preprocess(_opts(manifest, tmp_path / "ref", batch_size=1), codecs=codecs, verbose=False)
    out = tmp_path / "array"
    array = {"SLURM_ARRAY_TASK_COUNT": "2", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}
    procs = [subprocess.Popen(_common(manifest, out), env=_env(SLURM_ARRAY_TASK_ID=str(t), **array),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for t in (0, 1)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    errs = [e for _, e in results]
    assert "[rank 0/2, from SLURM array task]" in errs[0] and "[rank 1/2, from SLURM array task]" in errs[1]
    assert "this rank: 4 chunks" in errs[0] and "this rank: 3 chunks" in errs[1]
    assert sum(e.count("plan: wrote") for e in errs) == 1, errs  # one scan of the corpus for both
    assert _samples(out) == _samples(tmp_path / "ref")
    assert [p.name for p in list_shards(out)] == [p.name for p in list_shards(tmp_path / "ref")]
    assert (out / "errors.jsonl").read_text() == (tmp_path / "ref" / "errors.jsonl").read_text()
    assert not [p.name for p in out.iterdir() if ".tmp-" in p.name or p.name == plan_mod.LOCK_FILE]


@pytest.mark.slow
def test_killed_task_is_listed_by_status_and_rerunning_that_rank_completes(tmp_path, codecs):
    manifest = _corpus(tmp_path / "c")
    run_preprocess(_opts(manifest, tmp_path / "ref", batch_size=1), codecs=codecs, verbose=False)
    out = tmp_path / "out"
    array = {"SLURM_ARRAY_TASK_COUNT": "2", "SLURM_ARRAY_TASK_MIN": "0"}
    task0 = subprocess.run(_common(manifest, out), env=_env(SLURM_ARRAY_TASK_ID="0", **array), capture_output=True,
                           text=True, timeout=300)
    assert task0.returncode == 0, task0.stderr
    task1 = subprocess.Popen(_common(manifest, out), env=_env(SLURM_ARRAY_TASK_ID="1", DATA_PIPELINE_TEST_DELAY="0.4",
                                                              **array),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while not sidecar_path(out, "shard", 1).exists():  # rank 1's first chunk
        assert task1.poll() is None and time.time() < deadline
        time.sleep(0.05)
    os.killpg(task1.pid, signal.SIGKILL)
    task1.wait(timeout=30)
    assert not sidecar_path(out, "shard", 5).exists(), "the kill must land mid-run"

    rc, text, _ = _cli(["preprocess", "--out", str(out), "--status"])
    assert rc == 3 and "pending ranks: --array=1 " in text and "--world-size 2" in text, text
    # Resubmit just that rank, as `sbatch --array=1 ... --world-size 2` would start it.
    rerun = subprocess.run(_common(manifest, out) + ["--world-size", "2"],
                           env=_env(SLURM_ARRAY_TASK_ID="1", SLURM_ARRAY_TASK_MIN="1", SLURM_ARRAY_TASK_COUNT="1"),
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "[rank 1/2, from SLURM array id (--world-size given)]" in rerun.stderr
    assert "1 already done" in rerun.stderr or "2 already done" in rerun.stderr, rerun.stderr
    rc, text, _ = _cli(["preprocess", "--out", str(out), "--status"])
    assert rc == 0, text
    assert _samples(out) == _samples(tmp_path / "ref")  # no duplicates, no holes, same bytes
    assert (out / "errors.jsonl").read_text() == (tmp_path / "ref" / "errors.jsonl").read_text()
    stats = json.loads((out / "stats.json").read_text())
    assert stats["complete"] and stats["inputs"] == stats["written"] + stats["skipped"] == 13


# ------------------------------------------------------------------------------ bench, launch script
@pytest.mark.slow
def test_bench_data_reports_pipeline_and_worker_ratios(capsys):
    from data_pipeline.bench import bench_data

    # Tiny codecs: this checks the benchmark's mechanics; `anygpt bench data` runs it at real size.
    r = bench_data(n=6, seconds=0.3, shard_size=2, batch_size=2, real=False)
    assert [x["workers"] for x in r["runs"]] == [1, 2] and all(x["samples"] == 6 for x in r["runs"])
    assert r["ratio_pipeline_vs_codec"] == pytest.approx(r["runs"][0]["samples_per_s"] / r["codec"]["samples_per_s"])
    assert r["ratio_workers"] == pytest.approx(r["runs"][1]["samples_per_s"] / r["runs"][0]["samples_per_s"])
    assert 0 < r["ratio_encode_share"] <= 1
    assert r["breakdown"]["encode"] > 0 and r["breakdown"]["media decode (measured apart)"] > 0
    out = capsys.readouterr().out
    assert "ratio pipeline / codec alone" in out and "ratio 2 workers / 1 worker" in out and "tar write" in out


def test_slurm_preprocess_example_opens_with_its_launch_command():
    path = REPO / "launch" / "slurm_preprocess.sh"
    lines = path.read_text().splitlines()
    assert lines[0] == "#!/bin/bash" and lines[1].startswith("# sbatch --array=0-15 launch/slurm_preprocess.sh ")
    assert os.access(path, os.X_OK)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    assert "launch/preprocess.py" in path.read_text()
    # Outside an array job it refuses with one line instead of running every chunk in one task.
    r = subprocess.run(["bash", str(path)], env=_env(), capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "sbatch --array" in r.stderr
