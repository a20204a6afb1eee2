"""``anygpt eval``: held-out loss per modality and direction, a demo's own evaluation suite
(``--demo``), and the real-data harness (``--generate``: ASR WER, captioning, TTS intelligibility).

The loss is :func:`anygpt.eval.loss.heldout_loss`, the trainer's own evaluation, so the numbers match
the ``eval.jsonl`` rows of the run that made the model (same shards, same ``--seq-len``).

``--demo DIR``: the directory names its scorer in ``DIR/eval_suite.json``,
``{"scorer": "package.module:function"}``; the scorer is called as
``scorer(lm, codecs, demo_dir, n_items=..., sampling=...)`` and returns ``(results, table)``:
``results`` goes under ``"directions"`` in the JSON, ``table`` is printed.  So this package knows
nothing about what a demo evaluates.
"""
from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path
from typing import Any, Callable

from anygpt.config import ATTENTION_CHOICES
from anygpt.modalities import load_codecs

SUITE_FILE = "eval_suite.json"


def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="held-out loss per modality/direction (+ a demo's suite, + generation)",
                       description="Loss per modality and direction on held-out shards; with --demo DIR "
                                   "(an `anygpt demo` output) also the demo's own evaluation suite; with "
                                   "--generate the model answers held-out pairs.")
    p.add_argument("--model", required=True, help="exported Hugging Face model directory")
    p.add_argument("--data", required=True, help="held-out shards: file, glob, brace pattern or directory")
    p.add_argument("--demo", default=None, help=f"demo output dir: also run the scorer its {SUITE_FILE} names")
    p.add_argument("--codecs", default=None, help="codecs directory or 'tiny' (default MODEL/codecs)")
    p.add_argument("--items", type=int, default=48, help="held-out items per direction (--demo, --generate)")
    p.add_argument("--set", dest="settings", action="append", default=None, metavar="MODE.FIELD=VALUE",
                   help="text->X sampling override for --demo's suite, repeatable (default: the suite's own)")
    p.add_argument("--generate", action="store_true",
                   help="also let the model answer held-out pairs: ASR WER (transcribed modalities -> text), "
                        "captioning BLEU (captioned modalities -> text) and, with --asr-model, TTS "
                        "intelligibility (text -> transcribed audio modalities)")
    p.add_argument("--tasks", default="asr,caption,tts", help="with --generate: comma-separated subset of "
                                                               "asr,caption,tts (tts runs only with --asr-model)")
    p.add_argument("--asr-model", default=None, help="local ASR model directory (a Whisper or *ForCTC model saved "
                                                     "with its tokenizer and feature extractor) that transcribes "
                                                     "generated speech for --generate's tts; checked before any work")
    p.add_argument("--asr-language", default="en", help="language Whisper is told (no per-clip detection); "
                                                        "ignored by English-only and CTC models")
    p.add_argument("--soundstorm", default=None, help="SoundStorm decoder for tts (default MODEL/soundstorm)")
    p.add_argument("--seq-len", type=int, default=512, help="row length of the packed held-out batches")
    p.add_argument("--attention", default="auto", choices=ATTENTION_CHOICES,
                   help="attention path for the held-out loss over packed rows (default auto: what training "
                        "uses on this device; flex also runs forward-only on CPU)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.set_defaults(handler=run_eval)


def import_object(spec: str, where: str) -> Any:
    """``package.module:name`` -> the object (like a codec card's ``implementation``); one-line
    ``ValueError`` naming ``where`` when it cannot be imported."""
    module, _, name = str(spec).partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"{where}: {spec!r} cannot be imported ({type(e).__name__}: {e})") from None


def demo_scorer(demo_dir: str | Path) -> Callable[..., tuple[dict, str]]:
    """The scorer a demo directory names in its ``eval_suite.json``."""
    path = Path(demo_dir) / SUITE_FILE
    try:
        suite = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"--demo {demo_dir}: no {SUITE_FILE} (not an `anygpt demo` output directory, or one "
                         f"made before demos named their scorer)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(suite, dict) or not isinstance(suite.get("scorer"), str):
        raise ValueError(f"{path}: expected {{\"scorer\": \"package.module:function\"}}")
    return import_object(suite["scorer"], str(path))


def run_eval(args: argparse.Namespace) -> int:
    # torch and transformers load when the command runs, not when `anygpt --help` builds the parser.
    from anygpt.attention import resolve_attention
    from anygpt.infer.generation import pick_device
    from anygpt.infer.loading import load_lm

    # Everything that can be checked without the model fails before it loads.
    scorer = demo_scorer(args.demo) if args.demo else None
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if args.generate:
        from anygpt.eval.real import TASKS

        unknown = [t for t in tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"--tasks: unknown eval task(s) {', '.join(unknown)}; choose from {', '.join(TASKS)}")
        if args.asr_model is not None and "tts" in tasks:
            from anygpt.eval.asr import check_asr_dir

            check_asr_dir(args.asr_model, args.asr_language)  # language: told to Whisper, checked here
    resolve_attention(args.attention, pick_device("auto").type, training=False, key="--attention")
    data = args.data
    if Path(data).is_dir():
        data = str(Path(data) / "*.tar")
    model_dir = Path(args.model)
    codecs_src = args.codecs or model_dir / "codecs"
    lm = load_lm(args.model)
    result: dict[str, Any] = {"model": args.model, "data": data}
    try:
        _evaluate(args, lm, data, codecs_src, model_dir, scorer, tasks, result)
    except BaseException as e:
        # What was computed before the failure (the held-out loss, finished tasks) is not lost.
        if args.out:
            result["error"] = (str(e).splitlines() or [type(e).__name__])[0]
            _write(args.out, result)
            print(f"wrote the results computed before the failure to {args.out}")
        raise
    if args.out:
        _write(args.out, result)
        print(f"wrote {args.out}")
    return 0


def _write(path: str, result: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(result, indent=2, default=float) + "\n", encoding="utf-8")


def _evaluate(args: argparse.Namespace, lm: Any, data: str, codecs_src: Any, model_dir: Path,
              scorer: Callable[..., tuple[dict, str]] | None, tasks: list[str], result: dict[str, Any]) -> None:
    """Fill ``result`` section by section (the held-out loss first), so a failure keeps what came before."""
    from anygpt.eval.loss import shards_heldout_loss

    result.update(shards_heldout_loss(lm, data, args.seq_len, attention=args.attention))
    read = result["read"]
    print(f"held-out loss {result['loss']:.4f} over {result['tokens']} target tokens (attention {result['attention']})")
    for name, value in {**result["loss_by_task"], **result["loss_by_modality"]}.items():
        print(f"  {name:<12} {value:.4f}")
    if read.get("bad_shards"):
        print(f"  damaged shards: {len(read['bad_shards'])} ({read['lost_samples']} samples lost, named in the log above)")
    if scorer is not None:
        codecs = load_codecs(codecs_src)
        result["directions"], table = scorer(lm, codecs, Path(args.demo), n_items=args.items, sampling=args.settings)
        print(table)
    if args.generate:
        from anygpt.eval.real import evaluate_real, summary_lines, tts_modalities
        from anygpt.infer.mediaio import MediaIO, resolve_soundstorm

        if args.asr_model is None and "tts" in tasks:
            tasks.remove("tts")
            print("note: no --asr-model: tts intelligibility is skipped")
        wanted = tts_modalities(lm.layout, tasks)
        codecs = load_codecs(codecs_src, modalities=wanted) if wanted else {}
        # The acoustic decoder (SoundStorm; only speech's plugin asks for one) through the chat's loader of it.
        media = MediaIO(lm.layout, None, resolve_soundstorm(args.soundstorm, model_dir, codecs_src), lm.device)
        result["generate"] = {}
        evaluate_real(lm, codecs, data, items=args.items, tasks=tasks, asr_model=args.asr_model,
                      acoustic=lambda m: media.soundstorm(), asr_language=args.asr_language,
                      results=result["generate"])
        print("\n".join(summary_lines(result["generate"])))
