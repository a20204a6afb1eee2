"""``anygpt preprocess`` (and ``python launch/preprocess.py``): arguments -> options -> run.

Flags a user does not give keep the recipe's value (argparse defaults are ``None`` so the two can be
told apart), and the recipe's values keep the library defaults.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Optional

from anygpt import modalities as registry
from data_pipeline.options import ENGINES, SOURCES, PreprocessError, PreprocessOptions


def _positive_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", choices=SOURCES, help="reader for the input (or taken from --recipe)")
    p.add_argument("--input", help="manifest/JSONL file, corpus directory, or tar/directory of tars")
    p.add_argument("--out", help="output directory for shards, stats.json and errors.jsonl")
    codec = p.add_mutually_exclusive_group()
    codec.add_argument("--codecs", metavar="DIR", help="codecs directory with one <modality>/ subdirectory per codec")
    codec.add_argument("--tiny", action="store_true", help="use the tiny random codecs (tests, demo)")
    p.add_argument("--codec", dest="codec_names", action="append", default=None, metavar="NAME",
                   help="with --tiny: use codec NAME for the modality whose codec cards include it "
                        "(repeatable; default: each modality's default codec)")
    p.add_argument("--recipe", help="shipped recipe name (see --list-recipes) or a recipe YAML file")
    p.add_argument("--list-recipes", action="store_true", help="print the shipped recipes and exit")
    p.add_argument("--workers", type=_positive_int, default=None,
                   help="local worker processes, each with its own codecs (and GPU when present); default 1")
    p.add_argument("--shard-size", type=_positive_int, default=None,
                   help="inputs per chunk; one chunk = one shard (the unit of resume); default 1000")
    p.add_argument("--shard-bytes", type=int, default=None,
                   help="also cap a shard's size in bytes: a larger chunk spills into PREFIX-NNNNNN-1.tar, ...")
    p.add_argument("--rank", type=int, default=None,
                   help="this process's rank (default: RANK, else a SLURM array task's index, else SLURM_PROCID, else 0)")
    p.add_argument("--world-size", type=int, default=None,
                   help="number of ranks (default: WORLD_SIZE, else SLURM_ARRAY_TASK_COUNT, else SLURM_NTASKS, else 1); "
                        "alone in a SLURM array task, the array ids are the ranks (resubmitting some ranks)")
    p.add_argument("--status", action="store_true",
                   help="do no work: print done/pending chunks per rank of --out and the pending ranks as an "
                        "--array= expression; exit 0 when complete, 3 when work is pending")
    p.add_argument("--engine", choices=ENGINES, default=None,
                   help="local (processes on this machine, default) | ray (actors on a Ray cluster: pip install "
                        "'anygpt-trainer[ray]')")
    p.add_argument("--ray-address", default=None,
                   help="with --engine ray: the cluster to join (default: RAY_ADDRESS, else a local Ray instance)")
    p.add_argument("--ray-actor-cpus", type=float, default=None,
                   help="with --engine ray: CPUs per actor (default 1; actors: one per GPU, else --workers)")
    p.add_argument("--prefix", default=None, help="shard name prefix (default: the recipe name, else 'shard')")
    p.add_argument("--batch-size", type=_positive_int, default=None, help="media items per codec call (default 16)")
    p.add_argument("--device", default=None, help="auto (one GPU per worker if any) | cpu | cuda | cuda:N")
    p.add_argument("--modality", default=None,
                   help="media modality when the reader cannot tell (audio tars, manifest media field); "
                        f"a registered one: {', '.join(registry.names())}")
    p.add_argument("--limit", type=int, default=None, help="only the first N inputs (a trial run)")
    p.add_argument("--overwrite", action="store_true", help="delete a previous run's outputs in --out first")
    prog = p.add_mutually_exclusive_group()
    prog.add_argument("--progress", dest="progress", action="store_true", default=None, help="force the progress bar")
    prog.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    f = p.add_argument_group("filters (override the recipe's)")
    f.add_argument("--min-seconds", type=float, default=None, help="skip audio shorter than this")
    f.add_argument("--max-seconds", type=float, default=None, help="skip audio longer than this")
    f.add_argument("--clip-seconds", type=float, default=None, help="truncate longer audio to this")
    f.add_argument("--min-text-chars", type=int, default=None, help="skip shorter texts (default 1: skip empty)")
    f.add_argument("--max-text-chars", type=int, default=None, help="skip longer texts")
    f.add_argument("--min-image-side", type=int, default=None, help="skip images whose shorter side is smaller")
    f.add_argument("--max-aspect-ratio", type=float, default=None, help="skip images more elongated than this")


def add_preprocess_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``anygpt preprocess`` on the console script's subparsers."""
    p = sub.add_parser(
        "preprocess", help="encode a raw corpus into WebDataset token shards (parallel, resumable)",
        description="Read a corpus, encode its media with the codecs and write WebDataset shards "
                    "OUT/PREFIX-NNNNNN.tar plus OUT/stats.json and OUT/errors.jsonl. Rerunning the same "
                    "command resumes: finished shards are kept, unfinished ones redone; --status lists what is "
                    "missing (exit 3) and which ranks to resubmit.")
    add_arguments(p)
    p.set_defaults(handler=run_cli)


def options_from_args(args: argparse.Namespace) -> PreprocessOptions:
    """Recipe values first, then every flag the user gave; nothing is validated yet."""
    from data_pipeline.recipes import apply_recipe, load_recipe

    opts = PreprocessOptions()
    if args.recipe:
        opts = apply_recipe(opts, load_recipe(args.recipe))
    simple = {"source": args.source, "input": args.input, "out": args.out, "codecs": args.codecs,
              "workers": args.workers, "shard_size": args.shard_size, "shard_bytes": args.shard_bytes,
              "rank": args.rank, "world_size": args.world_size, "prefix": args.prefix,
              "batch_size": args.batch_size, "device": args.device, "modality": args.modality,
              "limit": args.limit, "progress": args.progress, "engine": args.engine,
              "ray_address": args.ray_address, "ray_actor_cpus": args.ray_actor_cpus}
    opts = dataclasses.replace(opts, **{k: v for k, v in simple.items() if v is not None})
    if args.tiny:
        opts.tiny = True
    if args.codec_names:
        opts.codec_names = list(args.codec_names)
    if args.overwrite:
        opts.overwrite = True
    flt = {"min_seconds": args.min_seconds, "max_seconds": args.max_seconds, "clip_seconds": args.clip_seconds,
           "min_text_chars": args.min_text_chars, "max_text_chars": args.max_text_chars,
           "min_image_side": args.min_image_side, "max_aspect_ratio": args.max_aspect_ratio}
    opts.filters = dataclasses.replace(opts.filters, **{k: v for k, v in flt.items() if v is not None})
    return opts


def print_recipes() -> None:
    from data_pipeline.recipes import list_recipes, load_recipe

    for name in list_recipes():
        r = load_recipe(name)
        print(f"{name:<20} {r.source:<14} {r.description}")
        if r.expects:
            print(f"{'':<20} --input: {r.expects}")


def run_cli(args: argparse.Namespace) -> int:
    if args.list_recipes:
        print_recipes()
        return 0
    from data_pipeline.runner import run_preprocess, run_status

    if args.status:
        if not args.out:
            raise PreprocessError("--status: give the run's --out")
        if args.world_size is not None and args.world_size < 1:
            raise PreprocessError(f"--world-size: must be >= 1, got {args.world_size}")
        return run_status(Path(args.out), args.world_size)

    opts = options_from_args(args)
    stats = run_preprocess(opts)
    mine = stats["this_rank"]
    if stats["inputs"] and not stats["written"] and stats.get("complete"):
        print(f"warning: no input could be used; see {opts.out}/errors.jsonl", file=sys.stderr)
    return 0 if mine is not None else 1


def main(argv: Optional[list[str]] = None) -> int:
    """Stand-alone entry (``python launch/preprocess.py``): same flags and exit codes as ``anygpt preprocess``."""
    p = argparse.ArgumentParser(prog="preprocess", description="Encode a raw corpus into WebDataset token shards.",
                                allow_abbrev=False)  # a shortened flag (--code) must not pick one
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return run_cli(args)
    except KeyboardInterrupt:
        print("interrupted (rerun the same command to resume)", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 1


__all__ = ["add_preprocess_parser", "add_arguments", "options_from_args", "run_cli", "main"]
