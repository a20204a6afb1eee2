"""``anygpt eval``: held-out loss per modality and direction, plus the synthetic task's directions."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="held-out loss per modality/direction (+ synthetic-task scores)",
                       description="Loss per modality and direction on held-out shards; with --demo DIR "
                                   "(an `anygpt demo` output) also every direction of the synthetic task "
                                   "against its chance level.")
    p.add_argument("--model", required=True, help="exported Hugging Face model directory")
    p.add_argument("--data", required=True, help="held-out shards: file, glob, brace pattern or directory")
    p.add_argument("--demo", default=None, help="demo output dir: also score the synthetic task's directions")
    p.add_argument("--codecs", default=None, help="codecs directory (default MODEL/codecs)")
    p.add_argument("--items", type=int, default=24, help="held-out items per direction (synthetic task)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.set_defaults(handler=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from anygpt.eval.run import evaluate_synthetic, shard_loss, summary_table
    from anygpt.infer.loading import load_lm

    data = args.data
    if Path(data).is_dir():
        data = str(Path(data) / "*.tar")
    lm = load_lm(args.model)
    result = {"model": args.model, "data": data, **shard_loss(lm, data, seq_len=args.seq_len)}
    print(f"held-out loss {result['loss']:.4f} over {result['tokens']} target tokens")
    for name, value in {**result["loss_by_task"], **result["loss_by_modality"]}.items():
        print(f"  {name:<12} {value:.4f}")
    if args.demo:
        from anygpt.modalities import load_codecs

        codecs = load_codecs(args.codecs or Path(args.model) / "codecs")
        result["directions"] = evaluate_synthetic(lm, codecs, Path(args.demo) / "shards", n_items=args.items)
        print(summary_table(result["directions"]))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2, default=float) + "\n", encoding="utf-8")
        print(f"wrote {args.out}")
    return 0
