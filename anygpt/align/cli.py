"""``anygpt align`` and ``launch/align.py``: the alignment stage, with training's launch contract.

``anygpt align --config FILE [key=value ...] [--resume auto|DIR] [--nproc N]`` runs what
``deepspeed launch/align.py --config FILE ...`` runs: in this process for one rank, or N local ranks
through ``torchrun`` (``python -m anygpt.align`` in each).  The config, DeepSpeed JSON, model,
prompt/pair files and every reward's model directory are checked (:func:`anygpt.align.loop.preflight`)
before anything is spawned: one ``error:`` line and exit status 1.
"""
from __future__ import annotations

import argparse

from anygpt.train import cli as train_cli
from anygpt.train.cli import _guarded, add_train_arguments

ALIGN_HELP = "align text->X generation (GRPO with rewards, or DPO) on the DeepSpeed engine"
ALIGN_DESCRIPTION = (
    "Preference alignment from an exported model, with a stage YAML (launch/configs/align_*.yaml) and dotted "
    "key=value overrides; the same run as `deepspeed launch/align.py --config FILE ...`. align.method grpo: "
    "samples per prompt scored by align.rewards (asr: a local Whisper/CTC model; judge: the demo's judge), "
    "group-normalised advantages, clipped ratio, optional KL; dpo: pairs from a JSONL or SpeechAlign-style "
    "(gold codes of shard pairs vs the policy's own samples, in rounds) or, with align.dpo.chosen=best, the best "
    "vs the worst of align.group_size own samples by align.rewards. Writes RUN_DIR/config.yaml, "
    "metrics.jsonl, reward.png and checkpoints/ (resume with --resume auto; anygpt export turns it into a model).")


def add_align_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("align", help=ALIGN_HELP, description=ALIGN_DESCRIPTION)
    add_train_arguments(p)
    p.set_defaults(handler=run_align)


def spawn_ranks(nproc: int, argv: list[str]) -> int:
    """Start ``nproc`` ranks of ``python -m anygpt.align ARGV`` on this machine; their exit status."""
    return train_cli.spawn_ranks(nproc, argv, module="anygpt.align")


ALIGN_STAGE = train_cli.Stage("anygpt.align", "anygpt.align.config:load_align_config", "anygpt.align.loop:preflight",
                              "anygpt.align.loop:align")


def run_align(args: argparse.Namespace) -> int:
    return train_cli.run_stage(args, ALIGN_STAGE, lambda n, argv: spawn_ranks(n, argv))


def align_main(argv: list[str] | None = None) -> int:
    """Entry of ``launch/align.py`` and ``python -m anygpt.align`` (each rank under a launcher)."""
    parser = argparse.ArgumentParser(prog="launch/align.py", description=ALIGN_DESCRIPTION)
    add_train_arguments(parser)
    return _guarded(run_align, parser.parse_intermixed_args(argv))
