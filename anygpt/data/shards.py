"""Shard lists and tar reading.

A shard spec is what a stage YAML writes in ``shards:``: a file, a directory (its ``*.tar``), a glob,
a brace pattern (``data-{000000..000099}.tar``), a URL WebDataset can open (``pipe:aws s3 cp
s3://b/x-{0..9}.tar -``, ``https://...``, ``gs://...``), or several of these joined with ``::``.

Tars are read with Python's ``tarfile`` in streaming mode and grouped into samples with
WebDataset's rule (the key is the member path up to the first dot of its basename), so the loader
counts samples itself and a restore can skip exactly ``n`` of them.  This is the one tar reader of the
project: a shard's ``__shard__`` header (:mod:`anygpt.data.schema`) says how many samples it holds,
and any shortfall (truncated tar, header corrupted mid-file, lost members) is raised as a
:class:`ShardError` carrying the number of samples lost, after every readable sample was yielded.
"""
from __future__ import annotations

import glob
import io
import logging
import os
import re
import tarfile
import zlib
from typing import Iterator

from anygpt.data.schema import HEADER_MEMBER, ShardFormatError, read_header

log = logging.getLogger(__name__)

_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)[.]([^/]*)$")
_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


class ShardError(ValueError):
    """A shard spec that expands to nothing, or a shard that cannot be opened/read.

    ``lost``: samples of the shard that could not be read (None when unknown: no count header, or
    the shard could not be opened at all).
    """

    def __init__(self, message: str, lost: int | None = None):
        super().__init__(message)
        self.lost = lost


def _is_url(spec: str) -> bool:
    # "C:" style drive letters are not a concern here; "file:" is handled as a local path.
    return bool(_URL.match(spec)) and not spec.startswith("file:")


def expand_shards(spec: str | list[str] | tuple[str, ...]) -> list[str]:
    """Expand a shard spec into an ordered list of shard URLs/paths (duplicates removed).

    Local patterns are checked here: a glob or path that matches no file raises :class:`ShardError`
    naming it, so a typo fails before training starts.  URLs (``pipe:``, ``https:`` ...) are only
    brace-expanded; they are opened when read.
    """
    import braceexpand

    if isinstance(spec, (list, tuple)):
        pieces = [p for s in spec for p in str(s).split("::")]
    else:
        pieces = str(spec).split("::")
    out: list[str] = []
    for piece in (p.strip() for p in pieces):
        if not piece:
            continue
        for item in braceexpand.braceexpand(piece):
            if _is_url(item):
                out.append(item)
                continue
            path = item[len("file:"):] if item.startswith("file:") else item
            path = os.path.expanduser(path)
            if os.path.isdir(path):
                found = sorted(glob.glob(os.path.join(path, "*.tar")) + glob.glob(os.path.join(path, "*.tar.gz")))
                if not found:
                    raise ShardError(f"{item}: directory holds no .tar shards")
                out += found
            elif glob.has_magic(path):
                found = sorted(glob.glob(path))
                if not found:
                    raise ShardError(f"{item}: glob matches no shard")
                out += found
            elif os.path.isfile(path):
                out.append(path)
            else:
                raise ShardError(f"{item}: shard not found")
    out = list(dict.fromkeys(out))
    if not out:
        raise ShardError(f"{spec!r}: shard spec is empty")
    return out


def shard_name(url: str) -> str:
    """Short name for logs and sample keys: the basename without ``.tar`` (or the command tail)."""
    base = url.rstrip("/").split("/")[-1].split()[0] if "/" in url else url.split()[-1]
    for suffix in (".tar.gz", ".tgz", ".tar"):
        if base.endswith(suffix):
            return base[: -len(suffix)]
    return base


def open_shard(url: str):
    """A readable binary stream for a local path or any URL WebDataset's ``gopen`` understands."""
    if not _is_url(url):
        path = url[len("file:"):] if url.startswith("file:") else url
        return open(path, "rb")
    from webdataset.gopen import gopen

    return gopen(url, "rb")


def _close(stream, finished: bool) -> None:
    """Close a stream; a pipe abandoned early is killed instead of waited for (no SIGPIPE error)."""
    proc = getattr(stream, "proc", None)
    if proc is not None and not finished and proc.poll() is None:
        proc.kill()
    try:
        stream.close()
    except Exception as e:  # a pipe killed on purpose exits non-zero; nothing to report then
        if finished:
            raise ShardError(f"closing shard failed: {e}") from None


def iter_tar_samples(stream: io.BufferedIOBase, url: str = "<stream>") -> Iterator[dict]:
    """Group a tar stream's members into samples ``{"__key__": k, ext: bytes, ...}``.

    Members are grouped while consecutive members share a key (WebDataset's convention).  A read
    error (truncated or corrupt tar), a shard that yields fewer samples than its header declares, or
    a header from a newer writer raises :class:`ShardError` after every readable sample before it has
    been yielded; the error's ``lost`` says how many samples are missing.
    """
    current: dict | None = None
    declared: int | None = None
    yielded = 0
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tf:
            for member in tf:
                if not member.isfile():
                    continue
                if member.name == HEADER_MEMBER:
                    f = tf.extractfile(member)
                    declared = read_header(f.read() if f is not None else b"", url)
                    continue
                m = _KEY_EXT.match(member.name)
                if m is None:  # no extension: not part of any sample (WebDataset ignores these too)
                    continue
                key, ext = m.group(1), m.group(2)
                f = tf.extractfile(member)
                data = f.read() if f is not None else b""
                if current is not None and current["__key__"] != key:
                    yielded += 1
                    yield current
                    current = None
                if current is None:
                    current = {"__key__": key}
                current[ext] = data
            # tarfile ends a stream quietly when it stops mid-archive; a complete tar ends with a
            # zero block, so reading less than one block past the last header means truncation.
            pos, end = getattr(tf.fileobj, "pos", None), getattr(tf, "offset", None)
            if isinstance(pos, int) and isinstance(end, int) and pos < end + tarfile.BLOCKSIZE:
                raise tarfile.ReadError("truncated: no end-of-archive marker")
    except ShardFormatError as e:
        raise ShardError(str(e)) from None
    except (tarfile.TarError, EOFError, OSError, ValueError, zlib.error) as e:
        lost = declared - yielded if declared is not None else None
        note = f"; {lost} of {declared} samples lost" if lost is not None else ""
        raise ShardError(f"{url}: unreadable tar ({type(e).__name__}: {e}){note}", lost) from None
    if current is not None:
        yielded += 1
        yield current
    if declared is not None and yielded < declared:
        raise ShardError(f"{url}: {declared - yielded} of {declared} samples lost (the tar ends early: "
                         f"truncated or corrupted in the middle)", declared - yielded)


def iter_shard_samples(url: str, skip: int = 0) -> Iterator[dict]:
    """Samples of one shard, after skipping the first ``skip`` (read, not decoded).

    Raises :class:`ShardError` when the shard cannot be opened or is truncated/corrupt (after
    yielding the complete samples before the damage).  Each sample carries ``__url__``.
    """
    try:
        stream = open_shard(url)
    except Exception as e:  # OSError, ValueError from gopen, ...
        raise ShardError(f"{url}: cannot open shard ({type(e).__name__}: {e})") from None
    finished = False
    try:
        for i, sample in enumerate(iter_tar_samples(stream, url)):
            if i < skip:
                continue
            sample["__url__"] = url
            yield sample
        finished = True
    finally:
        _close(stream, finished)
