"""``anygpt demo --out DIR [--quick]``: the README's first command."""
from __future__ import annotations

import argparse


def add_demo_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the whole pipeline on a synthetic corpus: shards, ZeRO-3 training, eval, report",
                       description="Make a synthetic any-to-any corpus (espeak-ng speech, Pillow images, NumPy "
                                   "music), fit tiny codecs, preprocess into WebDataset shards, train stage 1 and "
                                   "stage 2 with DeepSpeed ZeRO-3 on CPU ranks, export, evaluate every direction "
                                   "on held-out items against chance, render outputs, write DIR/report.{json,md}.")
    p.add_argument("--out", required=True, help="output directory (must be new or empty)")
    p.add_argument("--quick", action="store_true", help="small corpus and few steps (CI); scores are weaker")
    p.add_argument("--nproc", type=int, default=2, help="training ranks (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--codec", action="append", default=[], metavar="NAME",
                   help="use this codec for the modality it belongs to instead of its default (repeatable), "
                        "e.g. --codec mimi: 12.5 Hz speech tokens")
    p.add_argument("--speech-codec", default=None, metavar="NAME", help="the same, for speech: --speech-codec mimi")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from anygpt import modalities as registry
    from anygpt.demo.run import DemoSettings, run_demo

    if args.nproc < 1:
        raise ValueError(f"--nproc: must be >= 1, got {args.nproc}")
    codecs = registry.choose_codecs(args.codec + ([args.speech_codec] if args.speech_codec else []))
    if args.speech_codec and "speech" not in codecs:  # choose_codecs placed it with another modality
        raise ValueError(f"--speech-codec: {args.speech_codec} is not a speech codec")
    settings = DemoSettings.quick() if args.quick else DemoSettings()
    settings.codecs = codecs
    run_demo(args.out, quick=args.quick, seed=args.seed, nproc=args.nproc, settings=settings)
    return 0
