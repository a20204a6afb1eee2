"""Offline preprocessing: raw corpora -> codec codes -> sharded WebDataset tars (resumable, parallel).

``anygpt preprocess`` / ``python launch/preprocess.py`` read a corpus with one of six readers
(:mod:`data_pipeline.readers`), read every media item through its modality plugin and encode it with
the run's codec (:mod:`anygpt.modalities`), and write WebDataset shards plus accounting.  Everything
downstream (``anygpt.data``) depends only on the shard schema (:mod:`anygpt.data.schema`).

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
``plan.json`` + ``plan.inputs-<sha>.jsonl``
    The plan (:mod:`data_pipeline.plan`): every input of the corpus, numbered, one JSON line each,
    and the byte offset of each chunk's first line, with the settings that produced it (the same
    dict as ``run.json``).  Written once, atomically, by the first rank to start (the others wait
    on ``plan.lock``); every rank and every rerun reads only its own chunks' lines from it instead
    of scanning the corpus again.  A plan made with other settings is refused.  ``plan.json`` also
    records the world size of the latest run, which ``--status`` uses by default.
``stats.json``
    Aggregated over all sidecars: ``inputs``, ``written``, ``skipped``, ``skipped_by_reason``,
    ``tokens`` (LM tokens per modality: frames times the ``lm_codebooks`` of the run's codec card),
    ``codes`` (stored codes per modality), ``audio_hours`` (per modality whose items have a
    duration), ``media`` (items per modality), ``bytes``, ``shards`` (list of
    ``{"name", "samples", "bytes"}``), ``chunks_total``, ``chunks_done``, ``complete``, ``timings``
    (worker seconds per phase summed over chunks: ``read_s`` = media decode + resampling + filters,
    ``encode_s``, ``write_s`` = code checks + sample building + tar writing, ``chunk_s``; each
    sidecar holds its chunk's own ``timings``).
    ``inputs == written + skipped`` always.
``errors.jsonl``
    One line per skipped input: ``{"source", "corpus", "index", "key", "path", "reason", "detail",
    "chunk"}``.  Reasons: ``missing_file``, ``unreadable_media``, ``unreadable_archive``,
    ``bad_record``, ``bad_token_string``, ``empty_text``, ``text_too_short``, ``text_too_long``,
    ``text_filtered``, ``meta_filtered``, ``no_media``, ``too_short``, ``too_long``,
    ``image_too_small``, ``bad_aspect_ratio``, ``encode_error``, ``codes_out_of_range``,
    ``bad_code_shape``, ``duplicate_id``.
``run.json``
    The settings that determine the output (source, input, shard size, filters, codecs and the codec
    name of every modality, ...); a rerun with different settings (another ``--codec``) into the
    same ``OUT`` is refused before any work.

Samples
-------
What a shard and each sample hold (the ``__shard__`` header with the sample count, ``__key__``,
the ``json`` object, one ``.npy`` member of ``[K, T]`` codes per media item) is owned by
:mod:`anygpt.data.schema`; the workers build every sample with its ``encode_sample``, and the
media entries record the run's codec (card name) for each item.  Keys are unique within a shard:
an id repeated inside one chunk is skipped as ``duplicate_id``.

Ranks and engines
-----------------
A rank comes from ``--rank/--world-size``, else ``RANK/WORLD_SIZE``, else a SLURM array task
(``SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN`` of ``SLURM_ARRAY_TASK_COUNT``, times
``SLURM_NTASKS`` plus ``SLURM_PROCID`` for multi-task elements), else ``SLURM_PROCID/SLURM_NTASKS``
(:func:`data_pipeline.options.resolve_rank`).  ``--status`` prints done/pending chunks per rank and
the pending ranks as an ``--array=`` expression (exit 3 while work is pending).  A rank's chunks
run in-process, in ``--workers`` local processes, or with ``--engine ray`` on Ray actors
(:mod:`data_pipeline.ray_engine`); the shards are the same bytes whichever runs them.

Public API
----------
``run_preprocess(options, codecs=None) -> stats`` and ``run_status(out, world_size=None) -> exit code``
(:mod:`data_pipeline.runner`), ``Plan`` (:mod:`data_pipeline.plan`),
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
    "run_status": "data_pipeline.runner",
    "Plan": "data_pipeline.plan",
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
