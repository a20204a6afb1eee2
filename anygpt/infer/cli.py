"""``anygpt generate`` (base-model tasks) and ``anygpt chat`` (multimodal REPL).

Both load a model directory (our export or a released AnyGPT checkpoint), find codecs in
``--codecs DIR`` (default ``MODEL/codecs``; ``tiny`` = random codecs for tests and demos) and the
speech decoder in ``--soundstorm`` (default ``MODEL/soundstorm`` or ``CODECS/soundstorm``), and
write generated media under ``--out``.  Options that can be checked without a model (task strings,
sampling overrides, script file) are checked first, so a typo fails in a second, not after loading.

The per-modality flags come from the registered plugins: ``--max-{m}-seconds`` for each modality
with an input limit (``max_input_seconds``), ``--max-voice-seconds`` for the voice prompt, and
``--{m}-{option}`` for each decode option of its renderer (``render_options``: ``--image-steps``,
``--image-guidance`` ...).  This module stays light (the registry, no torch) so ``--help`` is quick.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from anygpt import modalities as registry

DEFAULT_OUT = "anygpt_outputs"


def _flag(*words: str) -> str:
    return "--" + "-".join(w.replace("_", "-") for w in words)


def _dest(*words: str) -> str:
    return "_".join(w.replace("-", "_") for w in words)


def add_model_arguments(p: argparse.ArgumentParser, out: bool = True) -> None:
    """The options every command that loads a model for generation shares (``generate``, ``chat``,
    ``serve``): model and codecs, device, sampling, media limits and rendering; ``--out`` with ``out``."""
    g = p.add_argument_group("model and media")
    g.add_argument("--model", required=True, metavar="HF_DIR",
                   help="model directory: an 'anygpt export' or a released AnyGPT checkpoint")
    g.add_argument("--tokenizer", default=None, metavar="DIR", help="tokenizer directory (default: the model's)")
    g.add_argument("--codecs", default=None, metavar="DIR|tiny",
                   help="codecs directory, one codec directory per modality "
                        f"({' '.join(m + '/' for m in registry.names())}; default: MODEL/codecs); 'tiny' = random codecs")
    g.add_argument("--soundstorm", default=None, metavar="DIR|FILE.pt|tiny|none",
                   help="speech acoustic decoder: a SoundStorm directory or AnyGPT's released .pt "
                        "(default: MODEL/soundstorm, then CODECS/soundstorm); 'none' renders layer 1 only")
    if out:
        g.add_argument("--out", default=DEFAULT_OUT, metavar="DIR", help=f"where outputs are written (default: {DEFAULT_OUT})")
    g.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1 ...")
    g.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="LM weights dtype (auto: bf16 on CUDA, fp32 on CPU)")
    g.add_argument("--context", type=int, default=None, metavar="N",
                   help="cap on prompt + answer tokens (default: the model's max_position_embeddings)")
    s = p.add_argument_group("sampling")
    s.add_argument("--max-new-tokens", type=int, default=2048, metavar="N", help="most tokens per answer (default 2048)")
    s.add_argument("--seed", type=int, default=None,
                   help="fix sampling (LM, acoustic decoder, renderers) for reproducible outputs")
    s.add_argument("--greedy", action="store_true", help="argmax decoding in every mode")
    first = next(iter(registry.names()), "text")
    s.add_argument("--set", dest="overrides", action="append", default=[], metavar="MODE.FIELD=VALUE",
                   help=f"per-modality sampling, e.g. --set {first}.temperature=0.8 --set all.top_p=0.9 "
                        f"(modes: text {' '.join(registry.names())} all; fields: temperature top_p top_k "
                        f"repetition_penalty max_tokens); repeatable")
    s.add_argument("--unconstrained", action="store_true",
                   help="sample without the span constraints (malformed output is reported, not prevented)")
    m = p.add_argument_group("media limits and rendering")
    voice = None
    for name, plugin in registry.registered().items():
        if plugin.max_input_seconds is not None:
            m.add_argument(_flag("max", name, "seconds"), dest=_dest("max", name, "seconds"), type=float,
                           default=None, metavar="S",
                           help=f"longest {name} input, longer is cut (default {plugin.max_input_seconds:g})")
        if plugin.acoustic_prompt and voice is None:
            voice = plugin
    if voice is not None:
        m.add_argument("--max-voice-seconds", type=float, default=None, metavar="S",
                       help=f"longest voice prompt for {voice.name} (default {voice.prompt_max_seconds:g})")
    for name, plugin in registry.registered().items():
        for option, (kind, text) in plugin.render_options.items():
            m.add_argument(_flag(name, option), dest=_dest(name, option), type=kind, default=None,
                           metavar=option.upper(), help=f"{name} rendering: {text}")


def add_generate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate", help="run base-model tasks such as 'text|image|a red bus' or 'speech|text|clip.wav'",
        description="Run stage-1 (base model) tasks 'in|out|content[|voice.wav]' as one batch: text|M|TEXT and "
                    f"M|text|FILE for each modality M of the model ({', '.join(registry.names())}); the voice "
                    "recording only for the voice-prompt modality. Outputs are written under --out and their "
                    "paths printed.")
    p.add_argument("tasks", nargs="+", metavar="TASK", help="in|out|content[|voice.wav]")
    p.add_argument("--samples", type=int, default=1, metavar="N", help="answers per task (batched)")
    p.add_argument("--instruction", default=None, help="instruction text (default: the first of the training pool)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")
    p.add_argument("--no-stream", action="store_true", help="do not print text while it is generated")
    add_model_arguments(p)
    p.set_defaults(handler=run_generate)


def add_chat_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "chat", help=f"multi-turn multimodal chat (files attached with {' '.join('/' + m for m in registry.names())})",
        description="Interactive chat with line editing and history; attach files with /<modality> PATH for each "
                    f"modality of the model ({', '.join('/' + m for m in registry.names())}), pick the answer voice "
                    "with /voice; /help lists commands. With --script FILE (or - for stdin, also used when stdin is "
                    "not a terminal) the same lines are read non-interactively.")
    p.add_argument("--script", default=None, metavar="FILE|-", help="read input lines from FILE or stdin ('-')")
    p.add_argument("--system", default=None, help="system prompt (default: the one recorded in the export, else none)")
    p.add_argument("--answer-reserve", type=int, default=None, metavar="N",
                   help="context tokens kept free for each answer when old turns are dropped (default: half the context)")
    p.add_argument("--history-file", default=str(Path("~/.anygpt_chat_history").expanduser()), metavar="FILE",
                   help="readline history for interactive sessions")
    p.add_argument("--debug", action="store_true", help="print tracebacks of unexpected errors")
    add_model_arguments(p)
    p.set_defaults(handler=run_chat_command)


# ---------------------------------------------------------------------------------------------- shared


def generation_config(args: argparse.Namespace):
    """The sampling settings of the command line (checked before a model is loaded)."""
    from anygpt.infer.settings import GenerationConfig, apply_setting_overrides, default_settings

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    cfg = GenerationConfig(modes=apply_setting_overrides(default_settings(), args.overrides),
                           max_new_tokens=args.max_new_tokens, constrained=not args.unconstrained, seed=args.seed)
    return cfg.with_greedy() if args.greedy else cfg


def load_model(args: argparse.Namespace, say) -> tuple[Any, Any]:
    """The LM and its :class:`~anygpt.infer.mediaio.MediaIO` from the command line; says what it loaded."""
    from anygpt.infer.loading import load_lm
    from anygpt.infer.mediaio import MediaIO, resolve_codecs, resolve_soundstorm, voice_modality

    model_dir = Path(args.model)
    codecs = resolve_codecs(args.codecs, model_dir)
    soundstorm = resolve_soundstorm(args.soundstorm, model_dir, codecs)
    lm = load_lm(model_dir, args.tokenizer, args.device, args.dtype, args.context)
    has = ", ".join(lm.layout.modalities) or "text only"
    missing = lm.layout.missing()  # reported, never guessed
    lacks = f" (no {', '.join(missing)})" if missing else ""
    say(f"loaded {model_dir} on {lm.device} ({next(lm.model.parameters()).dtype}), context {lm.context_length}, "
        f"roles {lm.layout.roles['user']}/{lm.layout.roles['assistant']}; modalities: {has}{lacks}; "
        f"codecs: {codecs or 'none'}; {voice_modality(lm.layout) or 'acoustic'} decoder: {soundstorm or 'none'}")
    media = MediaIO(lm.layout, codecs, soundstorm, lm.device, _limits(args), _render_options(args), seed=args.seed)
    return lm, media


def _limits(args: argparse.Namespace) -> dict[str, float]:
    """``--max-{m}-seconds`` and ``--max-voice-seconds`` that were given, by modality (and ``voice``)."""
    keys = [*registry.names(), "voice"]
    return {k: v for k in keys if (v := getattr(args, _dest("max", k, "seconds"), None)) is not None}


def _render_options(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """``--{m}-{option}`` by modality; a renderer's ``seed`` option follows ``--seed`` unless given."""
    out: dict[str, dict[str, Any]] = {}
    for name, plugin in registry.registered().items():
        for option in plugin.render_options:
            value = getattr(args, _dest(name, option), None)
            if value is None and option == "seed":
                value = args.seed
            if value is not None:
                out.setdefault(name, {})[option] = value
    return out


def system_prompt(args: argparse.Namespace) -> str | None:
    """``--system``, else a ``system_prompt`` recorded in the export's ``anygpt_export.json``."""
    if args.system is not None:
        return args.system or None
    meta = Path(args.model) / "anygpt_export.json"
    try:
        return json.loads(meta.read_text()).get("system_prompt") or None
    except (OSError, ValueError, AttributeError):
        return None


# ---------------------------------------------------------------------------------------------- handlers


def run_generate(args: argparse.Namespace) -> int:
    from anygpt.infer.tasks import parse_task, run_tasks

    tasks = [parse_task(t) for t in args.tasks]  # fail on a malformed task before loading anything
    if args.samples < 1:
        raise ValueError(f"--samples must be >= 1, got {args.samples}")
    config = generation_config(args)
    lm, media = load_model(args, print)
    results = run_tasks(lm, media, tasks, config, args.out, samples=args.samples, instruction=args.instruction,
                        stream=not args.no_stream)
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps([r.to_dict() for r in results], indent=2, ensure_ascii=False) + "\n")
        print(f"wrote {path}")
    failed = [r for r in results if r.error]
    if failed:
        print(f"{len(failed)} of {len(results)} task(s) failed", file=sys.stderr)
    return 1 if failed else 0


def run_chat_command(args: argparse.Namespace) -> int:
    from anygpt.infer.chat import ChatSession, TerminalChat, run_chat

    script = args.script
    if script is None and not sys.stdin.isatty():
        script = "-"  # piped input: read it as a script rather than prompting
    if script not in (None, "-") and not Path(script).is_file():
        raise ValueError(f"--script {script}: no such file")
    config = generation_config(args)
    lm, media = load_model(args, print)
    session = ChatSession(lm, media, config, args.out, system=system_prompt(args), answer_reserve=args.answer_reserve)
    chat = TerminalChat(session, debug=args.debug)
    if script is None:
        print("Chat with the model; /help lists commands, Ctrl-D or /quit leaves.")
    history = Path(args.history_file) if args.history_file else None
    return run_chat(chat, script=script, history_file=history)


def main(argv: list[str] | None = None, command: str = "chat") -> int:
    """Entry for ``launch/chat.py`` / ``launch/generate.py``: the same parser and error handling as
    the ``anygpt`` console script, without the other subcommands."""
    from anygpt.cli import UserError

    sub = argparse.ArgumentParser().add_subparsers()
    (add_chat_parser if command == "chat" else add_generate_parser)(sub)
    parser = sub.choices[command]
    parser.prog = f"python launch/{command}.py"
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (UserError, ValueError, OSError) as e:
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 1

