"""``anygpt train`` / ``anygpt export`` / ``anygpt plot`` (+ ``bench train``) and ``launch/train.py``.

``anygpt train --config FILE [key=value ...] [--resume auto|DIR] [--nproc N]`` runs exactly what
``deepspeed launch/train.py --config FILE ...`` runs: in this process for one rank, or, with
``--nproc N``, N ranks on this machine through ``torchrun`` (``python -m anygpt.train`` in each).
The config is loaded and checked (:func:`anygpt.train.preflight.preflight`) *before* anything is
spawned, so every invalid config is one ``error:`` line and exit status 1.  Under a launcher
(``deepspeed``, ``torchrun``, SLURM) every rank checks again and only rank 0 prints the error.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable

TRAIN_HELP = "train the LM with DeepSpeed (ZeRO-3 by default) from a stage YAML"
TRAIN_DESCRIPTION = (
    "Train the LM from a stage YAML (launch/configs/) with dotted key=value overrides; the same run as "
    "`deepspeed launch/train.py --config FILE ...`. One rank runs in this process; --nproc N starts N local "
    "ranks with torchrun. The config, DeepSpeed JSON, model/tokenizer/shard paths and resume point are "
    "checked before anything starts. Writes RUN_DIR/config.yaml, metrics.jsonl, eval.jsonl, tb/, loss.png "
    "and checkpoints/ (resume with --resume auto).")


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="stage YAML (launch/configs/*.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, e.g. run.dir=runs/x run.max_steps=200 optim.lr=1e-4")
    p.add_argument("--resume", default=None, metavar="auto|DIR",
                   help="'auto': continue from the newest complete checkpoint of run.dir (fresh start if none); "
                        "or a run/checkpoint directory")
    p.add_argument("--nproc", type=int, default=1,
                   help="ranks to start on this machine (torchrun); 1 = run in this process")
    # The deepspeed launcher appends --local_rank=N; the environment carries the same information.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def add_train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help=TRAIN_HELP, description=TRAIN_DESCRIPTION)
    add_train_arguments(p)
    p.set_defaults(handler=run_train)


def _is_launched() -> bool:
    """True inside a rank started by deepspeed/torchrun (they export WORLD_SIZE)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def _child_argv(args: argparse.Namespace) -> list[str]:
    argv = ["--config", args.config, *args.overrides]
    if args.resume is not None:
        argv += ["--resume", args.resume]
    return argv


def rank_command(nproc: int, argv: list[str], module: str = "anygpt.train") -> tuple[list[str], dict[str, str]]:
    """The command and environment that start ``nproc`` ranks of ``python -m MODULE ARGV`` on this
    machine (torchrun; each rank gets its share of the cores)."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", module, *argv]
    return cmd, env


def spawn_ranks(nproc: int, argv: list[str], module: str = "anygpt.train") -> int:
    """Start ``nproc`` ranks of ``python -m MODULE ARGV`` on this machine; their exit status."""
    cmd, env = rank_command(nproc, argv, module)
    return subprocess.call(cmd, env=env)


def _resolve(ref: str) -> Callable:
    """``"package.module:function"`` -> the function, imported when first used (so ``anygpt --help``
    stays fast) and looked up at every call (so tests can replace it)."""
    import importlib

    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Stage:
    """One DeepSpeed stage (``anygpt train``, ``anygpt align``): the module each rank runs, and as
    ``module:function`` references its config loader ``(path, overrides)``, the checks made before any
    rank starts ``(cfg, nproc, resume)`` and the run ``(cfg, resume=...)``.  The CLI and the demo start
    stages through this, so the loader/preflight pair of a stage is chosen in one place."""

    module: str
    load_config: str
    preflight: str
    run: str

    def checked_rank_command(self, config: str, nproc: int) -> tuple[list[str], dict[str, str]]:
        """Check ``config`` as the CLI does (one error before anything starts), then the command and
        environment that start its ``nproc`` ranks."""
        _resolve(self.preflight)(_resolve(self.load_config)(config, []), nproc, None)
        return rank_command(nproc, ["--config", config], self.module)


def run_stage(args: argparse.Namespace, stage: Stage, spawn: Callable[[int, list[str]], int]) -> int:
    """The launch contract every DeepSpeed stage shares (``anygpt train``, ``anygpt align``): the YAML
    plus overrides is loaded and checked; typed in a shell, the stage's preflight runs in this process
    (one error line, nothing spawned) and ``--nproc N`` > 1 starts N local ranks through ``spawn``;
    under a launcher (deepspeed, torchrun) this process is one rank and runs the stage."""
    from anygpt.config import ConfigError

    cfg = _resolve(stage.load_config)(args.config, args.overrides)
    if args.nproc < 1:
        raise ConfigError(f"--nproc: must be >= 1, got {args.nproc}")
    if _is_launched():
        if args.nproc != 1:
            raise ConfigError("--nproc: already running under a launcher (deepspeed/torchrun); drop --nproc")
    else:
        _resolve(stage.preflight)(cfg, args.nproc, args.resume)
        if args.nproc > 1:
            return spawn(args.nproc, _child_argv(args))
    _resolve(stage.run)(cfg, resume=args.resume)
    return 0


TRAIN_STAGE = Stage("anygpt.train", "anygpt.config:load_train_config", "anygpt.train.preflight:preflight",
                    "anygpt.train.loop:train")


def run_train(args: argparse.Namespace) -> int:
    return run_stage(args, TRAIN_STAGE, lambda n, argv: spawn_ranks(n, argv))


def _guarded(fn: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a handler; a user-fixable error is one line on stderr (rank 0 only), exit status 1."""
    try:
        return int(fn(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (ValueError, OSError) as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr, flush=True)
        return 1


def train_main(argv: list[str] | None = None) -> int:
    """Entry of ``launch/train.py`` and ``python -m anygpt.train`` (each rank under a launcher)."""
    parser = argparse.ArgumentParser(prog="launch/train.py", description=TRAIN_DESCRIPTION)
    add_train_arguments(parser)
    return _guarded(run_train, parser.parse_intermixed_args(argv))


# ---------------------------------------------------------------------------- export / plot
def add_export_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="consolidate a ZeRO checkpoint into a Hugging Face model directory",
                       description="Consolidate the ZeRO shards of a complete checkpoint (the newest of a run "
                                   "directory, or the one given) into HF_DIR: safetensors weights (LoRA merged), "
                                   "tokenizer, vocab_layout.json, codec cards (and codecs when the run named "
                                   "them); loadable by transformers.AutoModelForCausalLM.from_pretrained.")
    p.add_argument("--checkpoint", required=True, metavar="RUN_OR_CKPT_DIR",
                   help="run directory, its checkpoints/ directory, or one step-* checkpoint")
    p.add_argument("--out", required=True, metavar="HF_DIR")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                   help="weight dtype (default: the run's training precision)")
    p.set_defaults(handler=run_export)


def run_export(args: argparse.Namespace) -> int:
    import torch

    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    from anygpt.train.export import export_checkpoint

    rec = export_checkpoint(args.checkpoint, args.out, args.dtype)
    print(f"exported {rec['checkpoint']} (step {rec['step']}, {rec['dtype']}"
          f"{', LoRA merged' if rec['lora_merged'] else ''}) to {args.out}")
    return 0


def add_plot_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="draw a run's loss curves as a PNG",
                       description="Read RUN_DIR/metrics.jsonl (and eval.jsonl) and write RUN_DIR/loss.png.")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--out", default=None, help="PNG path (default RUN_DIR/loss.png)")
    p.set_defaults(handler=run_plot)


def run_plot(args: argparse.Namespace) -> int:
    from anygpt.train.plot import plot_run

    print(plot_run(args.run_dir, args.out))
    return 0


# ---------------------------------------------------------------------------- bench
def add_bench_train(sub: argparse._SubParsersAction) -> None:
    """Register ``bench train`` on the bench command's sub-parsers (or any subparsers object)."""
    p = sub.add_parser("train", help="trainer step time vs a bare DeepSpeed loop; loader vs training throughput")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--json", default=None, help="also write the result as JSON here")
    p.set_defaults(handler=run_bench_train)


def run_bench_train(args: argparse.Namespace) -> int:
    import json

    from anygpt.train.bench import bench_train

    result = bench_train(steps=args.steps, seq_len=args.seq_len, micro_batch_size=args.batch)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return 0
