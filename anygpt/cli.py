"""The ``anygpt`` console script: one command, checked subcommands.

Each subsystem registers its own subcommand through a ``register(subparsers)``-style function
named below; handlers import heavy libraries only when they run, so ``anygpt --help`` is instant.
Errors a user can fix (bad file, bad config) are printed as one line and exit with status 1.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Callable

# "module:function" registering one subcommand each, in the order `anygpt --help` lists them.
SUBCOMMANDS = [
    "anygpt.cli:add_layout_parser",
    "anygpt.resources:add_configs_parser",
    "anygpt.modalities.cli:add_codec_parser",
    "data_pipeline.cli:add_preprocess_parser",
    "anygpt.train.cli:add_train_parser",
    "anygpt.train.cli:add_export_parser",
    "anygpt.align.cli:add_align_parser",
    "anygpt.decoders.cli:add_soundstorm_parser",
    "anygpt.train.cli:add_plot_parser",
    "anygpt.infer.cli:add_generate_parser",
    "anygpt.infer.cli:add_chat_parser",
    "anygpt.serve.cli:add_serve_parser",
    "anygpt.eval.cli:add_eval_parser",
    "anygpt.demo.cli:add_demo_parser",
    "anygpt.bench:add_bench_parser",
]


class UserError(Exception):
    """An error whose message is the whole story (printed as one line, exit 1)."""


class Parser(argparse.ArgumentParser):
    """``ArgumentParser`` without prefix abbreviations, for every subcommand too (sub-parsers are
    built with the parent's class): ``--codec`` must never be read as an abbreviation of ``--codecs``."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


def add_layout_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("layout", help="print the vocabulary layout of a tokenizer directory",
                       description="Print base vocab size, every special token's id, every modality's "
                                   "offset/size/codebooks and the total. Works on our tokenizers and on "
                                   "released AnyGPT tokenizers (layout read from their added tokens).")
    p.add_argument("--tokenizer", required=True, help="local Hugging Face tokenizer directory")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(handler=run_layout)


def run_layout(args: argparse.Namespace) -> int:
    from anygpt.layout import VocabLayout
    from anygpt.text_tokenizer import load_tokenizer

    from anygpt.text_tokenizer import read_layout

    layout, saved = read_layout(load_tokenizer(args.tokenizer), args.tokenizer)
    d = {**layout.describe(), "missing": layout.missing(), "source": "vocab_layout.json" if saved else "tokenizer"}
    if args.json:
        print(json.dumps(d, indent=2, ensure_ascii=False))
        return 0
    print(f"base vocabulary   {d['base_vocab_size']}")
    for tok, tid in d["specials"].items():
        print(f"special           {tok:<10} {tid}")
    for name, m in d["modalities"].items():
        print(f"modality {name:<8} offset {m['offset']}  size {m['size']}  "
              f"codebooks {m['codebooks']}x{m['codebook_size']}  {m['start']}..{m['end']}  codec {m['codec'] or '?'}")
    print(f"total             {d['total']}")
    if d["missing"]:
        print(f"not in this layout: {', '.join(d['missing'])}")
    return 0


def build_parser(subcommands: list[str] = SUBCOMMANDS) -> argparse.ArgumentParser:
    parser = Parser(prog="anygpt", description="Train and serve any-to-any multimodal LMs on discrete tokens.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for spec in subcommands:
        module, func = spec.split(":")
        register: Callable = getattr(importlib.import_module(module), func)
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # key=value overrides must form one group (e.g. all after the flags)
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (UserError, ValueError, OSError, RuntimeError) as e:
        # Our error types subclass ValueError with one-line messages naming the file/key.
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
