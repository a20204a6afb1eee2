"""``anygpt eval``: held-out loss per modality and direction, the synthetic task's directions
(``--demo``), and the real-data harness (``--generate``: ASR WER, captioning, TTS intelligibility)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from anygpt.config import ATTENTION_CHOICES


def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="held-out loss per modality/direction (+ synthetic-task scores)",
                       description="Loss per modality and direction on held-out shards; with --demo DIR "
                                   "(an `anygpt demo` output) also every direction of the synthetic task "
                                   "against its chance level.")
    p.add_argument("--model", required=True, help="exported Hugging Face model directory")
    p.add_argument("--data", required=True, help="held-out shards: file, glob, brace pattern or directory")
    p.add_argument("--demo", default=None, help="demo output dir: also score the synthetic task's directions")
    p.add_argument("--codecs", default=None, help="codecs directory (default MODEL/codecs)")
    p.add_argument("--items", type=int, default=48, help="held-out items per direction (synthetic task, --generate)")
    p.add_argument("--set", dest="settings", action="append", default=None, metavar="MODE.FIELD=VALUE",
                   help="text->X sampling override for the synthetic task, repeatable (default: "
                        "all.repetition_penalty=1.0)")
    p.add_argument("--generate", action="store_true",
                   help="also let the model answer held-out pairs: ASR WER (speech->text), captioning BLEU "
                        "(image/music->text) and, with --asr-model, TTS intelligibility (text->speech)")
    p.add_argument("--tasks", default="asr,caption,tts", help="with --generate: comma-separated subset of "
                                                               "asr,caption,tts (tts runs only with --asr-model)")
    p.add_argument("--asr-model", default=None, help="local ASR model directory (Whisper, wav2vec 2.0 CTC...) "
                                                     "that transcribes generated speech for --generate's tts")
    p.add_argument("--soundstorm", default=None, help="SoundStorm decoder for tts (default MODEL/soundstorm)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--attention", default="auto", choices=ATTENTION_CHOICES,
                   help="attention path for the held-out loss over packed rows (default auto: what training "
                        "uses on this device; flex also runs forward-only on CPU)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.set_defaults(handler=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from anygpt.eval.run import SYNTHETIC_SAMPLING, evaluate_synthetic, shard_loss, summary_table
    from anygpt.infer.loading import load_lm

    if args.generate and args.asr_model is not None:
        from anygpt.eval.real import check_asr_dir

        check_asr_dir(args.asr_model)  # a bad --asr-model fails before any model is loaded
    from anygpt.attention import resolve_attention
    from anygpt.infer.generation import pick_device

    resolve_attention(args.attention, pick_device("auto").type, training=False, key="--attention")  # before loading
    data = args.data
    if Path(data).is_dir():
        data = str(Path(data) / "*.tar")
    lm = load_lm(args.model)
    result = {"model": args.model, "data": data,
              **shard_loss(lm, data, seq_len=args.seq_len, attention=args.attention)}
    print(f"held-out loss {result['loss']:.4f} over {result['tokens']} target tokens "
          f"(attention {result['attention']})")
    for name, value in {**result["loss_by_task"], **result["loss_by_modality"]}.items():
        print(f"  {name:<12} {value:.4f}")
    if args.demo:
        from anygpt.modalities import load_codecs

        codecs = load_codecs(args.codecs or Path(args.model) / "codecs")
        result["directions"] = evaluate_synthetic(lm, codecs, Path(args.demo) / "shards", n_items=args.items,
                                                  sampling=args.settings or SYNTHETIC_SAMPLING)
        print(summary_table(result["directions"]))
    if args.generate:
        from anygpt.eval.real import evaluate_real, summary_lines
        from anygpt.infer.mediaio import MediaIO, resolve_codecs, resolve_soundstorm

        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        if args.asr_model is None and "tts" in tasks:
            tasks.remove("tts")
            print("note: no --asr-model: tts intelligibility is skipped")
        model_dir = Path(args.model)
        codecs = resolve_codecs(args.codecs, model_dir)
        media = MediaIO(lm.layout, codecs, resolve_soundstorm(args.soundstorm, model_dir, codecs), lm.device,
                        speech_seed=0)
        result["generate"] = evaluate_real(lm, media, data, items=args.items, tasks=tasks, asr_model=args.asr_model)
        print("\n".join(summary_lines(result["generate"])))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2, default=float) + "\n", encoding="utf-8")
        print(f"wrote {args.out}")
    return 0
