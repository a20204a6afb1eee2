"""``anygpt align`` and ``launch/align.py``: the alignment stage, with training's launch contract.

``anygpt align --config FILE [key=value ...] [--resume auto|DIR] [--nproc N]`` runs what
``deepspeed launch/align.py --config FILE ...`` runs: in this process for one rank, or N local ranks
through ``torchrun`` (``python -m anygpt.align`` in each).  The config, DeepSpeed JSON, model,
prompt/pair files and every reward's model directory are checked (:func:`anygpt.align.loop.preflight`)
before anything is spawned: one ``error:`` line and exit status 1.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

from anygpt.train.cli import _child_argv, _guarded, _is_launched, add_train_arguments

ALIGN_HELP = "align text->X generation (GRPO with rewards, or DPO) on the DeepSpeed engine"
ALIGN_DESCRIPTION = (
    "Preference alignment from an exported model, with a stage YAML (launch/configs/align_*.yaml) and dotted "
    "key=value overrides; the same run as `deepspeed launch/align.py --config FILE ...`. align.method grpo: "
    "samples per prompt scored by align.rewards (asr: a local Whisper/CTC model; judge: the demo's judge), "
    "group-normalised advantages, clipped ratio, optional KL; dpo: pairs from a JSONL or SpeechAlign-style "
    "(gold codes of shard pairs vs the policy's own samples, in rounds). Writes RUN_DIR/config.yaml, "
    "metrics.jsonl, reward.png and checkpoints/ (resume with --resume auto; anygpt export turns it into a model).")


def add_align_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("align", help=ALIGN_HELP, description=ALIGN_DESCRIPTION)
    add_train_arguments(p)
    p.set_defaults(handler=run_align)


def spawn_ranks(nproc: int, argv: list[str]) -> int:
    """Start ``nproc`` ranks of ``python -m anygpt.align ARGV`` on this machine; their exit status."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "anygpt.align", *argv]
    return subprocess.call(cmd, env=env)


def run_align(args: argparse.Namespace) -> int:
    from anygpt.align.config import load_align_config
    from anygpt.config import ConfigError

    cfg = load_align_config(args.config, args.overrides)
    if args.nproc < 1:
        raise ConfigError(f"--nproc: must be >= 1, got {args.nproc}")
    if _is_launched():
        if args.nproc != 1:
            raise ConfigError("--nproc: already running under a launcher (deepspeed/torchrun); drop --nproc")
    else:
        from anygpt.align.loop import preflight

        preflight(cfg, args.nproc, args.resume)
        if args.nproc > 1:
            return spawn_ranks(args.nproc, _child_argv(args))
    from anygpt.align.loop import align

    align(cfg, resume=args.resume)
    return 0


def align_main(argv: list[str] | None = None) -> int:
    """Entry of ``launch/align.py`` and ``python -m anygpt.align`` (each rank under a launcher)."""
    parser = argparse.ArgumentParser(prog="launch/align.py", description=ALIGN_DESCRIPTION)
    add_train_arguments(parser)
    return _guarded(run_align, parser.parse_intermixed_args(argv))
