"""Offline preprocessing: raw corpora -> codec codes -> sharded WebDataset tars (resumable, parallel).

``anygpt preprocess`` / ``python launch/preprocess.py`` read a corpus with one of six readers
(:mod:`data_pipeline.readers`), encode every media item with the modality codecs, and write WebDataset
shards plus accounting.  Everything downstream (``anygpt.data``) depends only on the layout below.

Output directory (``OUT``)
--------------------------
``{prefix}-{chunk:06d}.tar``
    The shards.  Inputs are numbered in the reader's deterministic order and cut into *chunks* of
    ``--shard-size`` inputs (default 1000); chunk ``c`` holds inputs ``[c*S, (c+1)*S)`` and is written
    by rank ``c % world_size``.  The file name carries the *global* chunk number, so names never
    collide between ranks (each chunk has exactly one owner), and the set of shards is the same
    whatever the number of ranks or workers.  ``prefix`` defaults to ``shard`` (``--prefix`` or the
    recipe's ``prefix``).  With ``--shard-bytes B`` a chunk whose samples exceed ``B`` bytes spills
    into more files ``{prefix}-{chunk:06d}-{part}.tar`` (part = 1, 2, ...); glob ``OUT/*.tar``
    or take the list from ``stats.json["shards"]``.  Samples keep input order inside a chunk;
    skipped inputs leave no sample (so a shard may hold fewer than ``S`` samples).
``_chunks/{prefix}-{chunk:06d}.json``
    The commit record (sidecar) of a chunk: its parts, per-part sample counts and bytes, and the
    chunk's accounting and error lines.  A chunk is finished iff its sidecar exists and names
    existing parts; shards are written under ``*.tmp-<pid>`` names, renamed, then the sidecar is
    written atomically.  A rerun skips finished chunks and redoes the others, so a run killed at any
    point and rerun yields exactly the samples of an uninterrupted run.
``stats.json``
    Aggregated over all sidecars: ``inputs``, ``written``, ``skipped``, ``skipped_by_reason``,
    ``tokens`` (LM tokens per modality: speech = frames of layer 1, music = 4 per frame, image = 32
    per image), ``codes`` (stored codes per modality), ``audio_hours`` (per audio modality),
    ``images``, ``media`` (items per modality), ``bytes``, ``shards`` (list of
    ``{"name", "samples", "bytes"}``), ``chunks_total``, ``chunks_done``, ``complete``.
    ``inputs == written + skipped`` always.
``errors.jsonl``
    One line per skipped input: ``{"source", "corpus", "index", "key", "path", "reason", "detail",
    "chunk"}``.  Reasons: ``missing_file``, ``unreadable_media``, ``unreadable_archive``,
    ``bad_record``, ``bad_token_string``, ``empty_text``, ``text_too_short``, ``text_too_long``,
    ``text_filtered``, ``meta_filtered``, ``no_media``, ``too_short``, ``too_long``,
    ``image_too_small``, ``bad_aspect_ratio``, ``encode_error``, ``codes_out_of_range``,
    ``bad_code_shape``, ``duplicate_id``.
``run.json``
    The settings that determine the output (source, input, shard size, filters, codecs, ...); a rerun
    with different settings into the same ``OUT`` is refused before any work.

Sample schema (``json["format"] == 1``)
---------------------------------------
``__key__``
    The input's id with every character outside ``[A-Za-z0-9_-]`` replaced by ``_`` (WebDataset cuts
    keys at the first dot); unique within a shard (a repeated id inside one chunk is skipped as
    ``duplicate_id``).  The original id is ``json["id"]``.
``json`` (UTF-8 object)
    ``format``: 1; ``id``: original id; ``kind``: ``"pair"`` or ``"conversation"``; ``source``: the
    reader (``manifest``, ``librispeech``, ``commonvoice``, ``wds-pairs``, ``anygpt-jsonl``,
    ``conversations``); ``corpus``: recipe name or ``null``;
    ``media``: ``{npy_key: {"modality", "num_codebooks", "codebook_size", "frames", "frame_rate",
    "seconds", "sample_rate", "truncated", "origin"}}`` (audio-only fields are ``null`` for images;
    ``origin`` is the source path or ``tar:member``, ``null`` for token-string inputs);
    ``durations``: ``{npy_key: seconds}`` for audio items; ``meta``: reader/corpus specific values
    (speaker, chapter, url, width/height, up_votes, ...).

    Pairs add ``text`` (the caption / transcript) and ``modality`` (``speech`` | ``image`` | ``music``).
    Conversations add ``conversation``: ``[{"role": "user"|"assistant", "content": [part, ...]}]``
    with parts ``{"text": str}``, ``{"marker": "<-Ins->"|"<-Res->"}`` or ``{"speech"|"image"|"music":
    npy_key}``, and ``system`` (string or ``null``).
``.npy`` files, one per media item
    Pairs: ``speech.npy`` / ``image.npy`` / ``music.npy``.  Conversations: ``m{i}.{modality}.npy`` with
    ``i`` the 0-based index of the media item in order of appearance over the whole conversation
    (``m0.speech.npy``, ``m1.image.npy``, ...).  Each holds integer codes **with the codebook axis**,
    ``[K, T]``: speech K = 8 RVQ layers (all kept; the LM uses layer 1, the acoustic decoder 2-8),
    music K = 4, image K = 1 with T = 32.  Token-string inputs (``anygpt-jsonl``) only carry what the
    LM saw: speech K = 1.  ``json["media"][key]["num_codebooks"]`` always says K.  The dtype is the
    smallest that fits the codebook (``int16`` for every codec here): cast with ``.astype(np.int64)``
    before arithmetic; :func:`data_pipeline.shards.iter_samples` already does.

Public API
----------
``run_preprocess(options, codecs=None) -> stats`` (:mod:`data_pipeline.runner`),
``PreprocessOptions`` (:mod:`data_pipeline.options`), ``load_recipe(name_or_path)`` /
``list_recipes()`` (:mod:`data_pipeline.recipes`), ``iter_samples(paths)`` /
``list_shards(out_dir)`` (:mod:`data_pipeline.shards`, reading shards back without WebDataset),
``add_preprocess_parser(subparsers)`` (:mod:`data_pipeline.cli`), ``bench_data()``
(:mod:`data_pipeline.bench`).
"""
from __future__ import annotations

import importlib
from typing import Any

FORMAT = 1

_LAZY = {
    "run_preprocess": "data_pipeline.runner",
    "PreprocessOptions": "data_pipeline.options",
    "PreprocessError": "data_pipeline.options",
    "load_recipe": "data_pipeline.recipes",
    "list_recipes": "data_pipeline.recipes",
    "iter_samples": "data_pipeline.shards",
    "list_shards": "data_pipeline.shards",
    "add_preprocess_parser": "data_pipeline.cli",
    "bench_data": "data_pipeline.bench",
}


def __getattr__(name: str) -> Any:
    # Lazy: `import data_pipeline` must stay cheap (the CLI imports it to register a subcommand).
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'data_pipeline' has no attribute {name!r}")


__all__ = ["FORMAT", *_LAZY]
