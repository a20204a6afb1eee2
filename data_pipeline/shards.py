"""Shard files: deterministic tar writing, atomic commit, naming, and reading samples back.

Tars are written with fixed member metadata (mtime 0, uid/gid 0, mode 0644), so the same inputs
give byte-identical shards on every run; a shard is written under a ``.tmp-<pid>`` name and
renamed only when complete, and a chunk counts as finished only once its sidecar (the commit
record) exists.  See the package docstring for the naming scheme.  What a shard and a sample hold
is :mod:`anygpt.data.schema`'s business: every shard opens with its ``__shard__`` header, whose
sample count is filled in (in place, same size) when the shard is closed.
"""
from __future__ import annotations

import io
import json
import os
import re
import socket
import tarfile
import threading
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Union

from anygpt.data.schema import HEADER_BYTES, HEADER_MEMBER, decode_codes, header_bytes

CHUNK_DIR = "_chunks"


def chunk_stem(prefix: str, chunk: int) -> str:
    return f"{prefix}-{chunk:06d}"


def part_name(prefix: str, chunk: int, part: int) -> str:
    """Part 0 is ``{prefix}-{chunk:06d}.tar``; spill-over parts add ``-{part}``."""
    return f"{chunk_stem(prefix, chunk)}.tar" if part == 0 else f"{chunk_stem(prefix, chunk)}-{part}.tar"


def sidecar_path(out_dir: Union[str, Path], prefix: str, chunk: int) -> Path:
    return Path(out_dir) / CHUNK_DIR / f"{chunk_stem(prefix, chunk)}.json"


def atomic_write_text(path: Union[str, Path], text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file + ``os.replace`` (readers never see half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Unique per writer (host, process, thread): ranks on several nodes may write the same file.
    tmp = path.with_name(f"{path.name}.tmp-{socket.gethostname()}-{os.getpid()}-{threading.get_ident()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _member_size(n: int) -> int:
    return 512 + (n + 511) // 512 * 512


class ChunkWriter:
    """Writes one chunk's samples into ``{prefix}-{chunk:06d}.tar`` (+ spill-over parts).

    Args:
        out_dir: output directory.
        prefix, chunk: name of the chunk's shard(s).
        max_bytes: start a new part before a sample would push the current one past this size
            (a single sample larger than ``max_bytes`` still gets written, alone in its part).
    """

    def __init__(self, out_dir: Union[str, Path], prefix: str, chunk: int, max_bytes: Optional[int] = None):
        self.out_dir = Path(out_dir)
        self.prefix, self.chunk, self.max_bytes = prefix, chunk, max_bytes
        self.parts: list[dict[str, Any]] = []
        self._tar: Optional[tarfile.TarFile] = None
        self._tmp: Optional[Path] = None
        self._bytes = 0
        self._samples = 0

    def _member(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        self._tar.addfile(info, io.BytesIO(data))

    def _open(self) -> None:
        name = part_name(self.prefix, self.chunk, len(self.parts))
        self._tmp = self.out_dir / f"{name}.tmp-{os.getpid()}"
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.PAX_FORMAT)
        self._member(HEADER_MEMBER, header_bytes(0))  # the count is filled in by _finish
        self._bytes, self._samples = 0, 0

    def _finish(self) -> None:
        assert self._tar is not None and self._tmp is not None
        self._tar.close()
        with open(self._tmp, "rb+") as fh:
            # The header member's data starts right after its 512-byte tar header (a short name needs
            # no PAX record); same length, so only those bytes change.
            fh.seek(tarfile.BLOCKSIZE)
            assert fh.read(HEADER_BYTES) == header_bytes(0)
            fh.seek(tarfile.BLOCKSIZE)
            fh.write(header_bytes(self._samples))
            fh.flush()
            os.fsync(fh.fileno())
        final = self._tmp.with_name(self._tmp.name.rsplit(".tmp-", 1)[0])
        os.replace(self._tmp, final)
        self.parts.append({"name": final.name, "samples": self._samples, "bytes": final.stat().st_size})
        self._tar, self._tmp = None, None

    def add(self, key: str, files: list[tuple[str, bytes]]) -> int:
        """Add one sample: ``files`` are ``(extension, bytes)`` such as ``("json", b"{...}")``.

        Returns the sample's size in the tar (headers + padded data).
        """
        size = sum(_member_size(len(data)) for _, data in files)
        if self._tar is not None and self.max_bytes is not None and self._samples and self._bytes + size > self.max_bytes:
            self._finish()
        if self._tar is None:
            self._open()
        for ext, data in files:
            self._member(f"{key}.{ext}", data)
        self._bytes += size
        self._samples += 1
        return size

    def close(self) -> list[dict[str, Any]]:
        """Finish and rename the open part; returns ``[{"name", "samples", "bytes"}]`` (empty if no sample)."""
        if self._tar is not None:
            self._finish()
        return self.parts

    def abort(self) -> None:
        if self._tar is not None:
            try:
                self._tar.close()
            finally:
                if self._tmp is not None and self._tmp.exists():
                    self._tmp.unlink()
                self._tar, self._tmp = None, None


def read_sidecar(out_dir: Union[str, Path], prefix: str, chunk: int) -> Optional[dict]:
    """The chunk's commit record if the chunk is finished (sidecar readable, every part present)."""
    path = sidecar_path(out_dir, prefix, chunk)
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    for part in rec.get("parts", []):
        p = Path(out_dir) / part["name"]
        if not p.is_file() or p.stat().st_size != part["bytes"]:
            return None
    return rec


def remove_chunk_files(out_dir: Union[str, Path], prefix: str, chunk: int) -> None:
    """Delete an unfinished chunk's leftovers (temporary or renamed parts, stale sidecar)."""
    out = Path(out_dir)
    stem = chunk_stem(prefix, chunk)
    pat = re.compile(rf"^{re.escape(stem)}(-\d+)?\.tar(\.tmp-\d+)?$")
    for p in out.glob(f"{stem}*"):
        if pat.match(p.name):
            try:
                p.unlink()
            except FileNotFoundError:
                pass
    sc = sidecar_path(out, prefix, chunk)
    if sc.exists():
        sc.unlink()


def list_sidecars(out_dir: Union[str, Path], prefix: Optional[str] = None) -> list[dict]:
    """All readable sidecars of ``out_dir`` (finished chunks), by chunk number."""
    d = Path(out_dir) / CHUNK_DIR
    pat = re.compile(rf"^{re.escape(prefix) if prefix else '[A-Za-z0-9_]+'}-(\d{{6,}})\.json$")
    recs = []
    for p in sorted(d.glob("*.json")) if d.is_dir() else []:
        if not pat.match(p.name):
            continue
        try:
            recs.append(json.loads(p.read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            continue
    return sorted(recs, key=lambda r: r["chunk"])


def list_shards(out_dir: Union[str, Path]) -> list[Path]:
    """Shard paths of finished chunks, in chunk order (the authoritative list, from the sidecars)."""
    out = Path(out_dir)
    return [out / part["name"] for rec in list_sidecars(out) for part in rec.get("parts", [])]


def iter_samples(paths: Union[str, Path, Iterable[Union[str, Path]]], decode: bool = True) -> Iterator[dict[str, Any]]:
    """Read samples back: ``{"__key__", "__url__", "json": dict, "<name>.npy": int64 array}``.

    ``paths`` is a shard, a list of shards, or an output directory (its finished shards).  With
    ``decode=False`` values stay raw bytes (byte-exact comparisons).  This goes through the project's
    one tar reader, so a damaged shard raises :class:`anygpt.data.shards.ShardError` (after its
    readable samples) naming the shard and the samples lost.
    """
    from anygpt.data.shards import iter_shard_samples

    if isinstance(paths, (str, Path)):
        p = Path(paths)
        paths = list_shards(p) if p.is_dir() else [p]
    for path in paths:
        for raw in iter_shard_samples(str(path)):
            if decode:
                raw = {k: (json.loads(v) if k == "json" else decode_codes(v, k) if k.endswith("npy") else v)
                       for k, v in raw.items()}
            yield raw


__all__ = ["ChunkWriter", "part_name", "chunk_stem", "sidecar_path", "atomic_write_text", "read_sidecar", "remove_chunk_files", "list_sidecars", "list_shards", "iter_samples"]
