"""The plan of a run: every input, numbered and cut into chunks, listed once in the output directory.

Pass 1 of a run (the reader's scan of the corpus: directory listings, tar indexes, manifest rows)
is done **once per output directory**, not once per rank: the first rank to start writes

``plan.inputs-<sha>.jsonl``
    One JSON line per input (:class:`~data_pipeline.readers.InputItem`: id, paths, texts, small
    metadata; no media bytes), in the reader's order.  The name carries a hash of the content, so
    two ranks that both wrote it wrote the same file.
``plan.json``
    The commit record, written last and atomically: ``settings`` (the same dict as ``run.json``,
    :meth:`~data_pipeline.options.PreprocessOptions.fingerprint`) and its ``settings_hash``,
    ``inputs_total``, ``chunks_total``, ``shard_size``, ``modalities`` (media items per modality),
    ``inputs_file`` / ``inputs_bytes``, ``offsets`` (byte offset of each chunk's first line, plus
    the end) and ``world_size`` (of the latest run that started; ``--status`` uses it).

Every rank then reads only its own chunks' lines (one seek each).  A plan made with other settings
is refused with one line, as ``run.json`` is; the plan pins the input list, so files added to the
corpus later are not picked up (use another ``--out`` or ``--overwrite``).

Concurrent ranks (an array job starting at once): the plan is written by whoever takes
``plan.lock`` first (``O_EXCL`` create; the holder refreshes its mtime every few seconds).  The
others wait for ``plan.json``; when the lock stops changing for :data:`LOCK_STALE_S` seconds (its
holder died) one of them takes it over (a killed planner's half-written scan is removed later).  Correctness never depends on the lock: the plan is a
pure function of the settings and the corpus and is committed by atomic renames, so two ranks
writing it at once (a takeover racing a slow holder) write the same bytes.  The lock only avoids
W-fold scans.  Staleness is judged by the waiter's own clock watching the mtime change, so clock
skew between nodes does not matter.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Union

from data_pipeline.options import PreprocessError, PreprocessOptions
from data_pipeline.readers import InputItem, MediaRef
from data_pipeline.shards import atomic_write_text

PLAN_FILE = "plan.json"
INPUTS_PREFIX = "plan.inputs-"
LOCK_FILE = "plan.lock"
FORMAT = 1
# The planner touches the lock every LOCK_BEAT_S; a lock unchanged for LOCK_STALE_S is abandoned
# (well above NFS clients' attribute cache, up to 60 s, so a live planner is not mistaken for a dead one).
LOCK_BEAT_S = 5.0
LOCK_STALE_S = 120.0
WAIT_LOG_S = 30.0


# ------------------------------------------------------------------------------ inputs <-> JSON
_KEEP = ("id", "kind", "origin")


def item_to_json(item: InputItem) -> dict[str, Any]:
    """An input as a JSON object (fields at their default value are left out: plans stay small)."""
    d: dict[str, Any] = {}
    for f in dataclasses.fields(InputItem):
        v = getattr(item, f.name)
        if f.name not in _KEEP and (v is None or (isinstance(v, (list, dict, tuple)) and not v)):
            continue
        if f.name == "media":
            v = [{k: x for k, x in dataclasses.asdict(r).items() if x is not None} for r in v]
        d[f.name] = v
    return d


def item_from_json(d: dict[str, Any]) -> InputItem:
    """The inverse of :func:`item_to_json` (``InputItem`` equality holds for every reader's items)."""
    d = dict(d)
    d["media"] = [MediaRef(**r) for r in d.get("media", [])]
    if d.get("error") is not None:
        d["error"] = tuple(d["error"])
    return InputItem(**d)


# ------------------------------------------------------------------------------ settings check
def settings_mismatch(out: Path, name: str, before: dict[str, Any], opts: PreprocessOptions) -> Optional[str]:
    """The one-line refusal when ``before`` (the settings recorded in ``out/name``) differ from ``opts``."""
    settings = opts.fingerprint()
    diff = [k for k in sorted(set(settings) | set(before)) if settings.get(k) != before.get(k)]
    if not diff:
        return None
    k = diff[0]
    where = f"{out}" if name == "run.json" else f"{out}/{name}"
    return (f"{where} holds a run with other settings ({k}: {before.get(k)!r} there, {settings.get(k)!r} now); "
            "use another --out or --overwrite")


# ------------------------------------------------------------------------------ the plan
class Plan:
    """A committed plan (read it with :meth:`load`); chunks' inputs are read on demand."""

    def __init__(self, out: Union[str, Path], header: dict[str, Any]):
        self.out = Path(out)
        self.header = header

    @property
    def inputs_total(self) -> int:
        return int(self.header["inputs_total"])

    @property
    def chunks_total(self) -> int:
        return int(self.header["chunks_total"])

    @property
    def shard_size(self) -> int:
        return int(self.header["shard_size"])

    @property
    def modalities(self) -> dict[str, int]:
        return dict(self.header.get("modalities", {}))

    @property
    def settings(self) -> dict[str, Any]:
        return dict(self.header["settings"])

    @property
    def world_size(self) -> Optional[int]:
        return self.header.get("world_size")

    @property
    def prefix(self) -> str:
        return str(self.header["settings"].get("prefix", "shard"))

    def chunk_inputs(self, chunk: int) -> int:
        """Number of inputs of ``chunk``."""
        return min(self.shard_size, self.inputs_total - chunk * self.shard_size)

    @classmethod
    def load(cls, out: Union[str, Path]) -> Optional["Plan"]:
        """The plan of ``out``, or ``None`` if there is none (or its inputs file is missing/short)."""
        out = Path(out)
        try:
            header = json.loads((out / PLAN_FILE).read_text(encoding="utf-8"))
            size = (out / header["inputs_file"]).stat().st_size
        except (OSError, KeyError, TypeError, json.JSONDecodeError, UnicodeDecodeError):
            return None
        if header.get("format") != FORMAT or size != header.get("inputs_bytes"):
            return None
        return cls(out, header)

    def check(self, opts: PreprocessOptions) -> None:
        """Refuse a plan made with other settings (one line, like ``run.json``)."""
        msg = settings_mismatch(self.out, PLAN_FILE, self.settings, opts)
        if msg:
            raise PreprocessError(msg)

    def chunk_items(self, chunk: int) -> tuple[int, list[InputItem]]:
        """``(first_input_index, items)`` of ``chunk``, read from the plan with one seek."""
        if not 0 <= chunk < self.chunks_total:
            raise IndexError(f"chunk {chunk} outside the plan's {self.chunks_total} chunks")
        offsets = self.header["offsets"]
        with open(self.out / self.header["inputs_file"], "rb") as fh:
            fh.seek(offsets[chunk])
            data = fh.read(offsets[chunk + 1] - offsets[chunk])
        items = [item_from_json(json.loads(line)) for line in data.split(b"\n") if line]
        return chunk * self.shard_size, items

    def iter_chunks(self, chunks: Iterable[int]) -> Iterator[tuple[int, int, list[InputItem]]]:
        """``(chunk, first_input_index, items)`` for each of ``chunks``, lazily (bounded memory)."""
        for c in chunks:
            first, items = self.chunk_items(c)
            yield c, first, items

    def record_world_size(self, world: int) -> None:
        """Note the world size of a run that starts (``--status`` defaults to it); same-size runs write nothing."""
        if self.header.get("world_size") != world:
            self.header = {**self.header, "world_size": world}
            atomic_write_text(self.out / PLAN_FILE, json.dumps(self.header) + "\n")


def _unique() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{threading.get_ident()}"


def write_plan(out: Path, opts: PreprocessOptions, items: Iterable[InputItem], world: int,
               check: Callable[[dict[str, int]], None] = lambda modalities: None) -> Plan:
    """Scan ``items`` (the reader's pass 1) into a plan in ``out`` and commit it.

    ``check(modalities)`` runs after the scan and before the commit (a codec that is missing for
    the inputs found fails the run with nothing committed).
    """
    tmp = out / f"{INPUTS_PREFIX}tmp-{_unique()}"
    sha = hashlib.sha256()
    offsets: list[int] = []
    modalities: dict[str, int] = {}
    n = pos = 0
    try:
        with open(tmp, "wb") as fh:
            for item in items:
                if n % opts.shard_size == 0:
                    offsets.append(pos)
                line = (json.dumps(item_to_json(item), separators=(",", ":")) + "\n").encode("ascii")
                fh.write(line)
                sha.update(line)
                pos += len(line)
                n += 1
                for ref in item.media:
                    modalities[ref.modality] = modalities.get(ref.modality, 0) + 1
            fh.flush()
            os.fsync(fh.fileno())
        offsets.append(pos)
        check(modalities)
        name = f"{INPUTS_PREFIX}{sha.hexdigest()[:16]}.jsonl"
        os.replace(tmp, out / name)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    header = {"format": FORMAT, "settings": opts.fingerprint(), "settings_hash": opts.fingerprint_hash(),
              "inputs_total": n, "chunks_total": len(offsets) - 1, "shard_size": opts.shard_size,
              "modalities": dict(sorted(modalities.items())), "inputs_file": name, "inputs_bytes": pos,
              "world_size": world, "offsets": offsets}
    atomic_write_text(out / PLAN_FILE, json.dumps(header) + "\n")
    for old in out.glob(f"{INPUTS_PREFIX}*.jsonl"):  # an --overwrite's predecessor
        if old.name != name:
            old.unlink(missing_ok=True)
    for tmp_left in out.glob(f"{INPUTS_PREFIX}tmp-*"):  # a killed planner's scan (not a live one's)
        try:
            if time.time() - tmp_left.stat().st_mtime > 2 * LOCK_STALE_S:
                tmp_left.unlink()
        except FileNotFoundError:
            pass
    return Plan(out, header)


class PlanLock:
    """``plan.lock``: taken with ``O_EXCL``; a heartbeat thread keeps its mtime moving while held."""

    def __init__(self, out: Path):
        self.path = out / LOCK_FILE
        self.token = _unique()
        self._stop = threading.Event()
        self._beat: Optional[threading.Thread] = None

    def acquire(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as fh:
            fh.write(self.token + "\n")
        self._beat = threading.Thread(target=self._heartbeat, name="plan-lock", daemon=True)
        self._beat.start()
        return True

    def _heartbeat(self) -> None:
        while not self._stop.wait(LOCK_BEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                return

    def holder(self) -> str:
        try:
            return self.path.read_text(encoding="utf-8").strip() or "?"
        except OSError:
            return "?"

    def state(self) -> Optional[tuple[int, int]]:
        """What a waiter watches change: ``(mtime_ns, inode)``, ``None`` when there is no lock."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return st.st_mtime_ns, st.st_ino

    def break_stale(self) -> bool:
        """Move an abandoned lock out of the way (one waiter wins the rename)."""
        try:
            os.rename(self.path, self.path.with_name(f"{LOCK_FILE}.stale-{self.token}"))
        except FileNotFoundError:
            return False
        self.path.with_name(f"{LOCK_FILE}.stale-{self.token}").unlink(missing_ok=True)
        return True

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        if self.holder() == self.token:  # a waiter that took over a stale lock keeps its own
            self.path.unlink(missing_ok=True)


def obtain_plan(out: Path, opts: PreprocessOptions, world: int, items: Callable[[], Iterable[InputItem]],
                check: Callable[[dict[str, int]], None], log: Callable[[str], None]) -> tuple[Plan, bool]:
    """The plan of ``out``: read it, or (first rank to come) write it; returns ``(plan, written_here)``.

    ``items()`` opens the reader (called before ``out`` is created, so a bad corpus fails cleanly);
    ``check(modalities)`` runs on every plan before it is used.  With ``opts.overwrite`` an
    existing plan is replaced.  If this call created ``out`` and fails before committing a plan,
    ``out`` is removed again (nothing is left behind by a run that could not start).
    """
    if not opts.overwrite:
        plan = Plan.load(out)
        if plan is not None:
            plan.check(opts)
            check(plan.modalities)
            plan.record_world_size(world)
            return plan, False
    source = items()
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    lock = PlanLock(out)
    try:
        seen, since, logged = lock.state(), time.monotonic(), time.monotonic()
        while not lock.acquire():
            time.sleep(0.2)
            plan = Plan.load(out)
            if plan is not None and not opts.overwrite:
                plan.check(opts)
                check(plan.modalities)
                plan.record_world_size(world)
                log(f"plan: read {out / PLAN_FILE} (written by another rank meanwhile)")
                return plan, False
            now, state = time.monotonic(), lock.state()
            if state != seen:
                seen, since = state, now
            elif state is not None and now - since > LOCK_STALE_S:
                log(f"plan: {lock.path} has not moved for {LOCK_STALE_S:.0f} s (holder {lock.holder()} gone); taking over")
                lock.break_stale()
                seen, since = None, now
            if now - logged > WAIT_LOG_S:
                log(f"plan: waiting for {lock.holder()} to finish the plan of {out}")
                logged = now
        try:
            plan = None if opts.overwrite else Plan.load(out)  # committed while we were taking the lock
            if plan is not None:
                plan.check(opts)
                check(plan.modalities)
                plan.record_world_size(world)
                return plan, False
            t0 = time.perf_counter()
            plan = write_plan(out, opts, source, world, check)
            log(f"plan: wrote {out / PLAN_FILE} ({plan.inputs_total} inputs, {plan.chunks_total} chunks, "
                f"{time.perf_counter() - t0:.1f} s)")
            return plan, True
        finally:
            lock.release()
    except BaseException:
        if created and not any(out.iterdir()):
            out.rmdir()
        raise


__all__ = ["Plan", "PlanLock", "obtain_plan", "write_plan", "item_to_json", "item_from_json", "settings_mismatch",
           "PLAN_FILE", "LOCK_FILE", "INPUTS_PREFIX", "LOCK_STALE_S"]
