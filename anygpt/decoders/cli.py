"""``anygpt soundstorm`` and ``python launch/train_soundstorm.py``: train the SoundStorm acoustic decoder.

Only argument parsing lives here, so ``anygpt --help`` stays instant; the trainer (torch) is imported
when the command runs (:mod:`anygpt.decoders.train_soundstorm`).
"""
from __future__ import annotations

import argparse
import json
import sys

HELP = "train the SoundStorm acoustic decoder (the LM's codebooks -> all of the speech codec's)"
DESCRIPTION = (
    "Train the SoundStorm acoustic decoder from a YAML (launch/configs/soundstorm.yaml, or a shipped config's "
    "name) with dotted key=value overrides; the same run as `python launch/train_soundstorm.py --config FILE "
    "...`. Codebooks, codebook size, LM codebooks and frame rate come from the speech codec's card "
    "(model.codecs or the default card). The config, card, shards and resume point are checked before "
    "anything starts. Writes RUN_DIR/config.yaml, metrics.jsonl, checkpoints/ (resume with --resume auto) "
    "and the final decoder (config.json + model.safetensors: --soundstorm RUN_DIR).")


def add_soundstorm_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="SoundStorm YAML (launch/configs/soundstorm.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, e.g. run.dir=runs/ss run.max_steps=200 model.size=tiny data.shards=...")
    p.add_argument("--resume", default=None, metavar="auto|DIR",
                   help="'auto': continue from the newest complete checkpoint of run.dir (fresh start if none); "
                        "or a run/checkpoint directory")


def add_soundstorm_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("soundstorm", help=HELP, description=DESCRIPTION)
    add_soundstorm_arguments(p)
    p.set_defaults(handler=run_soundstorm)


def run_soundstorm(args: argparse.Namespace) -> int:
    """Load and check the config, train, print the summary as one JSON line."""
    from anygpt.decoders.train_soundstorm import load_soundstorm_config, train

    summary = train(load_soundstorm_config(args.config, args.overrides), resume=args.resume)
    print(json.dumps(summary))
    return 0


def soundstorm_main(argv: list[str] | None = None) -> int:
    """``python launch/train_soundstorm.py``: the ``anygpt soundstorm`` arguments; errors are one line."""
    p = argparse.ArgumentParser(prog="train_soundstorm.py", description=DESCRIPTION, allow_abbrev=False)
    add_soundstorm_arguments(p)
    args = p.parse_args(argv)
    try:
        return run_soundstorm(args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, OSError, RuntimeError) as e:
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 1
