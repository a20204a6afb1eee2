"""Source readers: turn a corpus on disk into a deterministic stream of :class:`InputItem`.

Readers only *list* inputs (paths, texts, small metadata); media bytes are read later by the
workers.  Two properties matter for everything downstream:

- **Determinism.**  The same corpus always yields the same items in the same order (files are
  sorted, rows keep file order), because an input's position decides its chunk, and so which
  shard it lands in: that is what makes resume and rank splitting exact.
- **Nothing raises for a bad row.**  A malformed line, a row without media, an unreadable archive
  becomes an item carrying ``error=(reason, detail)``; it is counted and logged in its chunk like
  any other skipped input, so ``inputs == written + skipped`` holds.  Only a problem with the
  corpus as a whole (no transcripts at all, an unknown manifest format) is a
  :class:`~data_pipeline.options.PreprocessError`, raised before any work.

Readers (``--source``):

``manifest``       JSONL/JSON/CSV/TSV rows: ``id``, ``text`` and one media column named by
                   modality (any registered one), paths relative to the manifest.
``librispeech``    LibriSpeech (``*.trans.txt`` + ``*.flac`` beside it) and MLS
                   (``transcripts.txt`` + ``audio/<spk>/<book>/<id>.flac``) folder layouts.
``commonvoice``    Common Voice ``<split>.tsv`` (``path``, ``sentence``, votes, ...) + ``clips/``.
``wds-pairs``      Raw WebDataset tars as img2dataset writes them: ``KEY.jpg`` + ``KEY.txt`` and/or
                   ``KEY.json`` (caption and url, size, scores); any member whose suffix a
                   modality plugin claims (audio, ...) works too.
``anygpt-jsonl``   AnyGPT token strings: pairs ``{"text", "image": "<soim><👀1>...<eoim>"}`` and
                   ``{"conversation": [...]}`` SFT records (parsed in the workers; no codec needed).
``conversations``  ``{"id", "conversation": [{"role", "content": [{"text"} | {<modality>: path} ...]}]}``.

Modality names (media columns, conversation part keys, per-turn keys) and media suffixes come from
the modality registry (:mod:`anygpt.modalities`), so a plugin's modality is read like a built-in one.
"""
from __future__ import annotations

import csv
import json
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from anygpt import modalities as registry
from data_pipeline.options import PreprocessError, PreprocessOptions

_MARKERS = re.compile(r"(<-Ins->|<-Res->)")
_ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "anygpt": "assistant",
          "mmgpt": "assistant", "bot": "assistant", "model": "assistant"}


@dataclass
class MediaRef:
    """Where one media item lives: a file, or a member of a tar (byte range), optionally a segment."""

    modality: str
    path: str
    member: Optional[str] = None
    offset: Optional[int] = None
    size: Optional[int] = None
    start: Optional[float] = None
    end: Optional[float] = None

    @property
    def origin(self) -> str:
        return f"{self.path}:{self.member}" if self.member else self.path


@dataclass
class InputItem:
    """One input of the corpus (becomes at most one sample).

    ``kind``: ``pair`` (text + one media), ``conversation`` (turns referring to ``media`` by index),
    ``anygpt`` (a raw token-string record parsed by the worker).  ``conversation`` turns hold parts
    ``{"text": s}``, ``{"marker": "<-Ins->"}`` or ``{"media": i}``.
    """

    id: str
    kind: str
    origin: str
    text: Optional[str] = None
    modality: Optional[str] = None
    media: list[MediaRef] = field(default_factory=list)
    conversation: Optional[list[dict]] = None
    system: Optional[str] = None
    meta: dict[str, Any] = field(default_factory=dict)
    record: Optional[dict] = None
    error: Optional[tuple[str, str]] = None


def get_field(row: Any, path: str) -> Any:
    """``row[path]``, else walk ``a.b.c`` into nested mappings/lists; ``None`` when absent."""
    if isinstance(row, dict) and path in row:
        return row[path]
    cur = row
    for part in path.split("."):
        if isinstance(cur, dict) and part in cur:
            cur = cur[part]
        elif isinstance(cur, list) and part.isdigit() and int(part) < len(cur):
            cur = cur[int(part)]
        else:
            return None
    return cur


def _str(v: Any) -> str:
    return "" if v is None else str(v)


def _num(v: Any) -> Any:
    """Numbers read from CSV/TSV cells become numbers (so meta filters can compare them)."""
    if isinstance(v, str):
        s = v.strip()
        if re.fullmatch(r"[+-]?\d+", s):
            return int(s)
        if re.fullmatch(r"[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?", s):
            return float(s)
    return v


def text_to_parts(text: str) -> list[dict]:
    """Split chain-of-modality markers out of a text: ``[{"text"}, {"marker"}, ...]``."""
    out = []
    for piece in _MARKERS.split(text):
        if piece in ("<-Ins->", "<-Res->"):
            out.append({"marker": piece})
        elif piece:
            out.append({"text": piece})
    return out


def _media_root(opts: PreprocessOptions, base: Path, default: str = "") -> Path:
    """``reader.media_root`` (relative to ``base``, the manifest's directory, unless absolute)."""
    root = opts.reader.media_root
    return base / (root if root else default) if not (root and Path(root).is_absolute()) else Path(root)


class Reader:
    """Base reader: ``iter(reader)`` yields :class:`InputItem` in a fixed order."""

    name = "base"

    def __init__(self, opts: PreprocessOptions):
        self.opts = opts
        self.input = Path(opts.input)
        f = opts.filters
        self.meta_fields = list(dict.fromkeys([*opts.fields.meta, *f.min_meta, *f.max_meta]))

    def __iter__(self) -> Iterator[InputItem]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _meta(self, row: Any, extra: Optional[dict] = None) -> dict:
        meta = dict(extra or {})
        for k in self.meta_fields:
            v = get_field(row, k)
            if v is not None:
                meta[k] = _num(v)
        return meta

    def _files(self, suffixes: tuple[str, ...]) -> list[Path]:
        """The input file, or every file with one of ``suffixes`` under the input directory, sorted."""
        if self.input.is_file():
            return [self.input]
        files = sorted(p for p in self.input.rglob("*") if p.is_file() and p.name.lower().endswith(suffixes))
        if not files:
            raise PreprocessError(f"--input: no {'/'.join(suffixes)} files under {self.input}")
        return files


# --------------------------------------------------------------------------------- manifests
class ManifestReader(Reader):
    """JSONL/JSON/CSV/TSV rows; one media column named by modality unless ``fields`` say otherwise."""

    name = "manifest"

    def __init__(self, opts: PreprocessOptions):
        super().__init__(opts)
        if not self.input.is_file():
            raise PreprocessError(f"--input: the manifest source takes a file, {self.input} is a directory")
        fmt = opts.reader.format
        if fmt == "auto":
            suffix = self.input.suffix.lower()
            fmt = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "tsv"}.get(suffix)
            if fmt is None:
                raise PreprocessError(f"--input: cannot tell the manifest format of {self.input.name} "
                                      "(use .jsonl/.json/.csv/.tsv or reader.format)")
        self.format = fmt
        self.root = _media_root(opts, self.input.parent)
        self.text_fields = opts.fields.text_fields(["text"])

    def rows(self) -> Iterator[tuple[int, Any, Optional[str]]]:
        """(row number from 1, row or None, error detail or None)."""
        path = self.input
        if self.format == "jsonl":
            with open(path, encoding="utf-8", errors="replace") as fh:
                head = fh.read(4096).lstrip()
            if head.startswith("["):  # a JSON array of records
                try:
                    data = json.loads(path.read_text(encoding="utf-8"))
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise PreprocessError(f"{path}: not valid JSON ({e})") from None
                for n, rec in enumerate(data, 1):
                    yield n, rec, None if isinstance(rec, dict) else "record is not a JSON object"
                return
            with open(path, encoding="utf-8", errors="replace") as fh:
                for n, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as e:
                        yield n, None, f"invalid JSON ({e.msg} at column {e.colno})"
                        continue
                    yield n, rec, None if isinstance(rec, dict) else "record is not a JSON object"
            return
        delim = "\t" if self.format == "tsv" else ","
        with open(path, encoding="utf-8", errors="replace", newline="") as fh:
            kwargs = {"quoting": csv.QUOTE_NONE} if delim == "\t" else {}
            reader = csv.reader(fh, delimiter=delim, **kwargs)
            header = next(reader, None)
            if not header:
                raise PreprocessError(f"{path}: empty manifest (no header row)")
            header = [h.strip() for h in header]
            for n, cells in enumerate(reader, 2):
                if not cells or all(not c.strip() for c in cells):
                    continue
                if len(cells) != len(header):
                    yield n, None, f"row has {len(cells)} fields, header has {len(header)}"
                    continue
                yield n, dict(zip(header, cells)), None

    def __iter__(self) -> Iterator[InputItem]:
        opts, f = self.opts, self.opts.fields
        stem = self.input.stem
        for n, row, err in self.rows():
            origin = f"{self.input}:{n}"
            fallback_id = f"{stem}_{n:09d}"
            if err is not None:
                yield InputItem(fallback_id, "pair", origin, error=("bad_record", err))
                continue
            rid = _str(get_field(row, f.id or "id")) or fallback_id
            text = next((_str(get_field(row, k)) for k in self.text_fields if _str(get_field(row, k)).strip()), "")
            item = InputItem(rid, "pair", origin, text=text, meta=self._meta(row))
            modality, rel = opts.modality, None
            try:
                if f.media_template:
                    rel = f.media_template.format_map(_Fields(row))
                elif f.media:
                    rel = _str(get_field(row, f.media))
                else:
                    for m in registry.names():
                        if _str(get_field(row, m)).strip():
                            rel, modality = _str(get_field(row, m)), modality or m
                            break
            except KeyError as e:
                item.error = ("bad_record", f"media_template needs field {e.args[0]!r}")
                yield item
                continue
            if not rel or not rel.strip():
                item.error = ("no_media", "row names no media file")
                yield item
                continue
            if modality is None:
                item.error = ("bad_record", "cannot tell the modality (set --modality or name the column "
                                            f"{'/'.join(registry.names())})")
                yield item
                continue
            ref = MediaRef(modality, str(self.root / rel.strip()))
            try:
                if f.start:
                    ref.start = float(get_field(row, f.start)) if _str(get_field(row, f.start)).strip() else None
                if f.end:
                    ref.end = float(get_field(row, f.end)) if _str(get_field(row, f.end)).strip() else None
            except (TypeError, ValueError):
                item.error = ("bad_record", f"segment bounds are not numbers ({get_field(row, f.start)!r}, "
                                            f"{get_field(row, f.end)!r})")
            item.modality, item.media = modality, [ref]
            yield item


class _Fields(dict):
    """``str.format_map`` view of a row's top-level fields as strings (a missing name raises KeyError)."""

    def __init__(self, row: dict):
        super().__init__({k: _str(v) for k, v in row.items()})


# ----------------------------------------------------------------------------- speech folders
class LibriSpeechReader(Reader):
    """LibriSpeech (``SPK/CHAP/SPK-CHAP.trans.txt``) and MLS (``transcripts.txt`` + ``audio/``) layouts."""

    name = "librispeech"

    def __init__(self, opts: PreprocessOptions):
        super().__init__(opts)
        if not self.input.is_dir():
            raise PreprocessError(f"--input: the librispeech source takes a corpus directory, got {self.input}")
        self.transcripts = sorted(
            p for p in self.input.rglob("*") if p.is_file() and (p.name.endswith(".trans.txt") or p.name == "transcripts.txt")
        )
        if not self.transcripts:
            raise PreprocessError(f"--input: no *.trans.txt (LibriSpeech) or transcripts.txt (MLS) under {self.input}")
        self.modality = opts.modality or "speech"
        self.exts = [e if e.startswith(".") else "." + e for e in opts.reader.audio_ext]
        self._listing: dict[Path, dict[str, str]] = {}

    def _find_audio(self, directory: Path, utt: str) -> Path:
        """The utterance's audio file (first existing extension), listing each directory once."""
        if directory not in self._listing:
            try:
                names = os.listdir(directory)
            except OSError:
                names = []
            self._listing = {directory: {n: n for n in names}}  # keep one directory cached
        names = self._listing[directory]
        for ext in self.exts:
            if utt + ext in names:
                return directory / (utt + ext)
        return directory / (utt + self.exts[0])

    def __iter__(self) -> Iterator[InputItem]:
        for tfile in self.transcripts:
            mls = tfile.name == "transcripts.txt"
            with open(tfile, encoding="utf-8", errors="replace") as fh:
                for n, line in enumerate(fh, 1):
                    line = line.rstrip("\n")
                    if not line.strip():
                        continue
                    origin = f"{tfile}:{n}"
                    utt, _, text = line.partition("\t" if mls and "\t" in line else " ")
                    utt = utt.strip()
                    parts = utt.split("_" if mls else "-")
                    if not utt or len(parts) < 3:
                        yield InputItem(f"{tfile.stem}_{n:09d}", "pair", origin, error=("bad_record", f"bad utterance id {utt!r}"))
                        continue
                    directory = tfile.parent / "audio" / parts[0] / parts[1] if mls else tfile.parent
                    audio = self._find_audio(directory, utt)
                    meta = {"speaker": parts[0], "chapter" if not mls else "book": parts[1],
                            "layout": "mls" if mls else "librispeech"}
                    yield InputItem(utt, "pair", origin, text=text, modality=self.modality,
                                    media=[MediaRef(self.modality, str(audio))], meta=meta)


class CommonVoiceReader(Reader):
    """Common Voice ``<split>.tsv`` (``path``, ``sentence`` ...) with audio in ``clips/``."""

    name = "commonvoice"

    def __init__(self, opts: PreprocessOptions):
        super().__init__(opts)
        if self.input.is_dir():
            split = opts.reader.split
            tsv = self.input / (split if split.endswith(".tsv") else split + ".tsv")
            if not tsv.is_file():
                have = sorted(p.name for p in self.input.glob("*.tsv"))
                raise PreprocessError(f"--input: {tsv.name} not found in {self.input} (has: {', '.join(have) or 'no .tsv'})")
        else:
            tsv = self.input
        self.tsv = tsv
        self.clips = _media_root(opts, tsv.parent, "clips")
        self.modality = opts.modality or "speech"
        with open(tsv, encoding="utf-8", errors="replace") as fh:
            header = fh.readline().rstrip("\n").split("\t")
        missing = [c for c in ("path", "sentence") if c not in header]
        if missing:
            raise PreprocessError(f"{tsv}: missing column(s) {', '.join(missing)} (Common Voice TSVs have path, sentence)")

    def __iter__(self) -> Iterator[InputItem]:
        with open(self.tsv, encoding="utf-8", errors="replace", newline="") as fh:
            reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
            header = next(reader)
            for n, cells in enumerate(reader, 2):
                if not cells:
                    continue
                origin = f"{self.tsv}:{n}"
                if len(cells) != len(header):
                    yield InputItem(f"{self.tsv.stem}_{n:09d}", "pair", origin,
                                    error=("bad_record", f"row has {len(cells)} fields, header has {len(header)}"))
                    continue
                row = dict(zip(header, cells))
                rel = row["path"].strip()
                rid = Path(rel).stem or f"{self.tsv.stem}_{n:09d}"
                meta = {k: _num(v) for k, v in row.items() if k not in ("path", "sentence") and v != ""}
                meta.update(self._meta(row))
                if not rel:
                    yield InputItem(rid, "pair", origin, text=row["sentence"], meta=meta, error=("no_media", "empty path"))
                    continue
                yield InputItem(rid, "pair", origin, text=row["sentence"], modality=self.modality,
                                media=[MediaRef(self.modality, str(self.clips / rel))], meta=meta)


# ---------------------------------------------------------------------------- WebDataset tars
def _wds_split(name: str) -> tuple[str, str]:
    """WebDataset's rule: the key is the path up to the first dot of the basename."""
    d, _, base = name.rpartition("/")
    key, dot, ext = base.partition(".")
    return (f"{d}/{key}" if d else key), ext


class WdsPairsReader(Reader):
    """img2dataset-style tars: ``KEY.jpg`` + ``KEY.txt`` / ``KEY.json`` (or other media members).

    A member is media of the modality whose plugin ``suffixes`` claim its extension; when several
    claim it (speech and music both read ``.wav``), ``--modality`` picks, else the first in registry
    order.  A sample with several media members uses one of ``--modality`` if any, else the first
    modality in registry order.
    """

    name = "wds-pairs"
    MAX_TEXT_MEMBER = 1 << 20
    TEXT_EXT = ("txt", "json")

    def __init__(self, opts: PreprocessOptions):
        super().__init__(opts)
        self.tars = self._files((".tar",))
        self.text_fields = opts.fields.text_fields(["txt", "json.caption"])
        self.order = {m: i for i, m in enumerate(registry.names())}
        self.modality_of_ext: dict[str, str] = {}
        for name, plugin in registry.registered().items():
            for suffix in plugin.suffixes:
                ext = suffix.lower().lstrip(".")
                if ext not in self.TEXT_EXT and (ext not in self.modality_of_ext or name == opts.modality):
                    self.modality_of_ext[ext] = name
        default_meta = ["url", "width", "height", "original_width", "original_height"]
        self.json_meta = list(dict.fromkeys([*(self.opts.fields.meta or default_meta), *self.meta_fields]))

    def __iter__(self) -> Iterator[InputItem]:
        for tpath in self.tars:
            yield from self._tar_items(tpath)

    def _tar_items(self, tpath: Path) -> Iterator[InputItem]:
        try:
            tf = tarfile.open(tpath, "r:")
        except (tarfile.TarError, OSError) as e:
            yield InputItem(tpath.stem, "pair", str(tpath), error=("unreadable_archive", f"{tpath}: {e}"))
            return
        group: list[tarfile.TarInfo] = []
        cur_key = None
        with tf:
            try:
                for info in tf:
                    if not info.isfile():
                        continue
                    key, _ = _wds_split(info.name)
                    if cur_key is not None and key != cur_key:
                        yield self._item(tf, tpath, cur_key, group)
                        group = []
                    cur_key = key
                    group.append(info)
            except (tarfile.TarError, OSError) as e:
                if group:
                    yield self._item(tf, tpath, cur_key, group)
                # The rest of the archive is lost: one input stands for it in the accounting.
                yield InputItem(f"{tpath.stem}_unreadable_rest", "pair", str(tpath),
                                error=("unreadable_archive", f"{tpath}: {e}"))
                return
            if group:
                yield self._item(tf, tpath, cur_key, group)

    def _read_small(self, tf: tarfile.TarFile, info: tarfile.TarInfo) -> Optional[bytes]:
        if info.size > self.MAX_TEXT_MEMBER:
            return None
        fh = tf.extractfile(info)
        data = fh.read() if fh else None
        return data if data is not None and len(data) == info.size else None

    def _item(self, tf: tarfile.TarFile, tpath: Path, key: str, members: list[tarfile.TarInfo]) -> InputItem:
        sid = key.rpartition("/")[2]
        origin = f"{tpath}:{key}"
        by_ext = {_wds_split(m.name)[1].lower(): m for m in members}
        texts: dict[str, str] = {}
        record: dict = {}
        problems = []
        for ext, m in by_ext.items():
            if ext in self.TEXT_EXT:
                data = self._read_small(tf, m)
                if data is None:
                    problems.append(f"{m.name}: unreadable or too large")
                    continue
                s = data.decode("utf-8", errors="replace")
                if ext == "txt":
                    texts["txt"] = s
                else:
                    try:
                        rec = json.loads(s)
                        record = rec if isinstance(rec, dict) else {}
                    except json.JSONDecodeError:
                        problems.append(f"{m.name}: invalid JSON")
        text = ""
        for fld in self.text_fields:
            if fld == "txt":
                v = texts.get("txt", "")
            elif fld.startswith("json."):
                v = _str(get_field(record, fld[5:]))
            else:
                v = _str(get_field(record, fld))
            if v.strip():
                text = v
                break
        meta = {}
        for k in self.json_meta:
            v = get_field(record, k)
            if v is not None:
                meta[k] = _num(v)
        item = InputItem(sid, "pair", origin, text=text, meta=meta)
        media = [(self.modality_of_ext[e], m) for e, m in by_ext.items() if e in self.modality_of_ext]
        if not media:
            item.error = ("no_media", f"no media member for key {key} (has {', '.join(sorted(by_ext))})")
            return item
        if not text and problems:
            item.error = ("bad_record", "; ".join(problems))
            return item
        modality, m = min(media, key=lambda mm: (mm[0] != self.opts.modality, self.order[mm[0]]))
        item.modality = modality
        item.media = [MediaRef(modality, str(tpath), member=m.name, offset=m.offset_data, size=m.size)]
        return item


# ---------------------------------------------------------------------- JSONL record readers
class _JsonlRecords(Reader):
    def _records(self) -> Iterator[tuple[Path, int, Optional[dict], Optional[str]]]:
        for path in self._files((".jsonl", ".json", ".ndjson")):
            with open(path, encoding="utf-8", errors="replace") as fh:
                head = fh.read(4096).lstrip()
            if head.startswith("["):
                try:
                    data = json.loads(path.read_text(encoding="utf-8"))
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise PreprocessError(f"{path}: not valid JSON ({e})") from None
                for n, rec in enumerate(data, 1):
                    yield path, n, (rec if isinstance(rec, dict) else None), (None if isinstance(rec, dict) else "record is not a JSON object")
                continue
            with open(path, encoding="utf-8", errors="replace") as fh:
                for n, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as e:
                        yield path, n, None, f"invalid JSON ({e.msg} at column {e.colno})"
                        continue
                    if not isinstance(rec, dict):
                        yield path, n, None, "record is not a JSON object"
                        continue
                    yield path, n, rec, None

    def _conversation_key(self, rec: dict) -> Optional[str]:
        if self.opts.reader.conversation_key:
            return self.opts.reader.conversation_key
        return next((k for k in ("conversation", "conversations", "chat", "messages") if k in rec), None)


class AnyGPTJsonlReader(_JsonlRecords):
    """AnyGPT token-string records; parsing (and its errors) happens in the workers."""

    name = "anygpt-jsonl"

    def __iter__(self) -> Iterator[InputItem]:
        for path, n, rec, err in self._records():
            origin = f"{path}:{n}"
            fallback = f"{path.stem}_{n:09d}"
            if err is not None:
                yield InputItem(fallback, "anygpt", origin, error=("bad_record", err))
                continue
            rid = _str(get_field(rec, self.opts.fields.id or "id")) or fallback
            key = self._conversation_key(rec)
            if key and key != "conversation":
                rec = {**rec, "conversation": rec[key]}
            yield InputItem(rid, "anygpt", origin, record=rec, meta=self._meta(rec))


class ConversationsReader(_JsonlRecords):
    """Multimodal conversations whose turns refer to media files (AnyInstruct-style).

    A turn is ``{"role", "content"}`` where content is a string or a list of parts
    (``{"text": s}``, ``{<modality>: path}``, or ``{"type": <modality>, <modality> | "path": path}``
    for any registered modality); ``message``/``text`` strings and per-turn ``<modality>`` keys (a
    path or a list) are accepted too.  A ``system`` turn or record field becomes the system prompt.
    """

    name = "conversations"

    def __init__(self, opts: PreprocessOptions):
        super().__init__(opts)
        self.media_root = opts.reader.media_root

    def __iter__(self) -> Iterator[InputItem]:
        for path, n, rec, err in self._records():
            origin = f"{path}:{n}"
            fallback = f"{path.stem}_{n:09d}"
            if err is not None:
                yield InputItem(fallback, "conversation", origin, error=("bad_record", err))
                continue
            rid = _str(get_field(rec, self.opts.fields.id or "id")) or fallback
            item = InputItem(rid, "conversation", origin, meta=self._meta(rec))
            try:
                self._parse(rec, item, _media_root(self.opts, path.parent))
            except _BadRecord as e:
                item.error = ("bad_record", str(e))
                item.media, item.conversation = [], None
            yield item

    def _media(self, item: InputItem, root: Path, modality: str, value: Any) -> list[dict]:
        values = value if isinstance(value, list) else [value]
        parts = []
        for v in values:
            if not isinstance(v, str) or not v.strip():
                raise _BadRecord(f"{modality} part is not a path: {v!r}")
            item.media.append(MediaRef(modality, str(root / v.strip())))
            parts.append({"media": len(item.media) - 1})
        return parts

    def _parse(self, rec: dict, item: InputItem, root: Path) -> None:
        known = registry.names()
        key = self._conversation_key(rec)
        turns_in = rec.get(key) if key else None
        if not isinstance(turns_in, list) or not turns_in:
            raise _BadRecord("record has no conversation list")
        if isinstance(turns_in[0], list):  # some releases nest turns one level deeper
            turns_in = [t for group in turns_in for t in group]
        system = rec.get("system")
        turns = []
        for k, t in enumerate(turns_in):
            if not isinstance(t, dict):
                raise _BadRecord(f"turn {k} is not an object")
            role_raw = _str(t.get("role", t.get("from", ""))).strip().lower()
            if role_raw == "system":
                system = _str(t.get("content", t.get("message", t.get("text", t.get("value")))))
                continue
            role = _ROLES.get(role_raw)
            if role is None:
                raise _BadRecord(f"turn {k}: unknown role {role_raw!r}")
            parts: list[dict] = []
            content = t.get("content", t.get("message", t.get("text", t.get("value"))))
            if isinstance(content, str):
                parts += text_to_parts(content)
            elif isinstance(content, list):
                for p in content:
                    if isinstance(p, str):
                        parts += text_to_parts(p)
                        continue
                    if not isinstance(p, dict):
                        raise _BadRecord(f"turn {k}: content part {p!r} is not an object")
                    typ = p.get("type")
                    mods = [m for m in known if m in p]
                    if typ in known:
                        parts += self._media(item, root, typ, p.get(typ, p.get("path")))
                    elif mods:
                        parts += self._media(item, root, mods[0], p[mods[0]])
                    elif "text" in p:
                        parts += text_to_parts(_str(p["text"]))
                    elif "marker" in p:
                        parts.append({"marker": _str(p["marker"])})
                    else:
                        raise _BadRecord(f"turn {k}: content part has no text or media ({sorted(p)})")
            elif content is not None:
                raise _BadRecord(f"turn {k}: content is neither text nor a list")
            for m in known:  # per-turn media keys (AnyInstruct metadata style)
                if m in t:
                    parts += self._media(item, root, m, t[m])
            if not parts:
                raise _BadRecord(f"turn {k} is empty")
            turns.append({"role": role, "content": parts})
        if not turns:
            raise _BadRecord("conversation has no user/assistant turns")
        item.conversation, item.system = turns, (system if isinstance(system, str) and system.strip() else None)


class _BadRecord(Exception):
    pass


READERS: dict[str, type[Reader]] = {
    r.name: r for r in (ManifestReader, LibriSpeechReader, CommonVoiceReader, WdsPairsReader, AnyGPTJsonlReader,
                        ConversationsReader)
}


def build_reader(opts: PreprocessOptions) -> Reader:
    """The reader for ``opts.source``; raises :class:`PreprocessError` if the input cannot be read at all."""
    try:
        cls = READERS[opts.source]
    except KeyError:
        raise PreprocessError(f"--source: unknown source {opts.source!r}") from None
    return cls(opts)


__all__ = ["MediaRef", "InputItem", "Reader", "READERS", "build_reader", "get_field", "text_to_parts"]
