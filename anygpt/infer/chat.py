"""Multi-turn multimodal chat: the one conversation object, and the terminal REPL that prints it.

:class:`ChatSession` is the chat logic every front end shares (``anygpt chat``, the page and the
OpenAI-style API of ``anygpt serve``): every turn is rendered with the one template of
``anygpt.formats`` (the same the model was trained on), the answer is generated under the modality
constraints, its media spans are rendered to files, and the parsed answer joins the history.  It
prints nothing: an answer is a list of :class:`~anygpt.infer.generation.Event` objects (text deltas,
spans, files, notices), also passed one by one to a callback while they happen.  The history is kept
as parts (text and code arrays), not strings, so re-rendering it is exact; when it no longer fits the
context next to room for an answer, the oldest exchanges are dropped with a notice.

:class:`TerminalChat` reads lines, runs commands, and prints the events (``ConsolePrinter``).

Input lines::

    any text                  send it (with any pending attachments)
    /<modality> PATH [text]   attach a file of one of the model's modalities (/image, /speech ...)
                              and send, when text follows
    /voice PATH | off         the voice to answer in (SoundStorm voice prompt; models whose layout
                              has the voice-prompt modality)
    /send                     send the pending attachments without text
    /settings [MODE.F=V ...]  show or change sampling settings
    /history  /reset  /save FILE  /help  /quit

Bad input never ends the session: a missing or unreadable file, an unsupported format, over-long
audio (cut to the limit with a notice), an empty line, an unknown command, Ctrl-C (at the prompt: a
hint; while generating: the turn is discarded) each print one message.  EOF and ``/quit`` end it
cleanly.  ``--script FILE|-`` reads the same lines from a file or stdin (tests, scripted demos).
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TextIO

import numpy as np

from anygpt import modalities as registry
from anygpt.formats import Conversation, Marker, Media, Part, Text, Turn
from anygpt.infer.generation import ConsolePrinter, ContextError, Event, EventStreamer, GenerationResult
from anygpt.infer.mediaio import MediaIO, no_modality, voice_modality
from anygpt.infer.settings import GenerationConfig, apply_setting_overrides, settings_table
from anygpt.layout import VocabLayout

GENERAL_COMMANDS = ("/send", "/settings", "/history", "/reset", "/save", "/help", "/quit", "/exit")


def example_file(modality: str) -> str:
    """``file.png`` / ``file.wav`` / ...: a file name the modality reads, for hints."""
    plugin = registry.get(modality)
    return "file" + (plugin.suffixes[0] if plugin.suffixes else plugin.output_suffix)


def commands(layout: VocabLayout) -> tuple[str, ...]:
    """The chat's commands for a model: one ``/<modality>`` per modality of its layout, ``/voice`` when
    it has the voice-prompt modality, then the general ones."""
    voice = ("/voice",) if voice_modality(layout) else ()
    return (*(f"/{m}" for m in layout.modalities), *voice, *GENERAL_COMMANDS)


def help_text(layout: VocabLayout) -> str:
    """``/help`` for a model (its modalities' commands, examples with its modalities' names)."""
    rows = [(f"/{m} PATH [text]", f"attach a {m} file, e.g. /{m} {example_file(m)}"
                                  + (" (sent at once when text follows)" if i == 0 else ""))
            for i, m in enumerate(layout.modalities)]
    rows.append(("/send", "send pending attachments without text (an empty line does the same)"))
    voice = voice_modality(layout)
    if voice is not None:
        rows.append(("/voice PATH | off", f"answer {voice} in this voice (voice cloning); '/voice' shows the current one"))
    example = next(iter(layout.modalities), "text")
    rows += [("/settings [M.F=V ...]", f"show or change sampling, e.g. /settings {example}.temperature=0.8 all.top_p=0.9"),
             ("/history", "list the turns kept in context"),
             ("/reset", "forget the conversation (settings and voice stay)"),
             ("/save FILE", "save the conversation as JSON (media as file paths)"),
             ("/help", "this text"),
             ("/quit", "leave (Ctrl-D too)")]
    width = max(len(c) for c, _ in rows) + 2
    lines = ["Type a message and press Enter.  Commands:"] + [f"  {c:<{width}}{h}" for c, h in rows]
    lines.append("Paths with spaces go in quotes; a line starting with '//' sends text that starts with '/'.")
    return "\n".join(lines)

# The smallest answer worth generating: below this the prompt is "too long" rather than "tight".
MIN_ANSWER_TOKENS = 16


def split_path_arg(rest: str) -> tuple[str, str]:
    """``'"my file.png" what is it'`` -> (``my file.png``, ``what is it``); unquoted paths end at a space."""
    rest = rest.strip()
    if not rest:
        return "", ""
    if rest[0] in "\"'":
        end = rest.find(rest[0], 1)
        if end < 0:
            raise ValueError(f"unclosed quote in {rest!r}")
        return rest[1:end], rest[end + 1:].strip()
    path, _, text = rest.partition(" ")
    return path, text.strip()


@dataclass
class ChatAnswer:
    """What one turn produced: its events in order, the generation result, exchanges dropped."""

    events: list[Event]
    result: GenerationResult
    dropped: int = 0

    @property
    def text(self) -> str:
        """The answer's text (media spans and markers left out)."""
        return self.result.text.strip()

    @property
    def files(self) -> list[Event]:
        """The ``file`` events: generated media written to disk, in answer order."""
        return [e for e in self.events if e.kind == "file"]

    def messages(self, *kinds: str) -> list[str]:
        """The texts of the notices of these kinds (default: info, note, warning, error)."""
        kinds = kinds or ("info", "note", "warning", "error")
        return [e.text for e in self.events if e.kind in kinds]


class ChatSession:
    """One conversation: history, voice, settings; builds prompts and turns answers into events.

    Args:
        lm: a :class:`~anygpt.infer.loading.LoadedLM`.
        media: encodes attachments and renders answers.
        config: sampling settings (a turn may pass its own).
        out_dir: where generated media go.
        system: system prompt (None: none, as in stage-1 and AnyGPT's release).
        answer_reserve: context tokens kept free for the answer when trimming history
            (default: half the context, at most ``config.max_new_tokens``).
        history: earlier turns (an API request carries its whole conversation).
    """

    def __init__(self, lm: Any, media: MediaIO, config: GenerationConfig, out_dir: str | Path,
                 system: str | None = None, answer_reserve: int | None = None,
                 history: list[Turn] | None = None) -> None:
        self.lm = lm
        self.media = media
        self.config = config
        self.out_dir = Path(out_dir)
        self.system = system
        self.answer_reserve = answer_reserve
        self.history: list[Turn] = list(history or [])
        self.voice: np.ndarray | None = None
        self.voice_path: str | None = None
        self.files: dict[int, str] = {}  # id(Media part) -> file it came from / was written to
        self.turn_no = 0
        self.dropped_total = 0
        self.voice_modality = voice_modality(lm.layout)

    # ------------------------------------------------------------------ inputs
    def encode(self, modality: str, path: str | Path) -> tuple[Media, list[str]]:
        """A file -> a :class:`Media` part of ``modality`` plus notes (``ValueError`` naming the file)."""
        part, notes = self.media.encode_file(modality, path)
        self.files[id(part)] = str(Path(path).expanduser().resolve())
        return part, notes

    def set_voice(self, path: str | Path | None) -> list[str]:
        """Answer the voice-prompt modality in the voice of the recording at ``path`` (None: no voice
        prompt); returns notes.  ``ValueError`` for a model without that modality or a bad file."""
        if path is None:
            self.voice, self.voice_path = None, None
            return []
        codes, notes = self.media.voice_prompt(path)
        self.voice, self.voice_path = codes, str(path)
        return notes

    def reset(self) -> None:
        """Forget the conversation (settings and voice stay)."""
        self.history.clear()

    def tokens(self, part: Media) -> int:
        """LM ids a media part takes in the prompt."""
        return len(self.lm.layout.codes_to_ids(part.modality, part.codes))

    # ------------------------------------------------------------------ a turn
    def fit(self, user: Turn, config: GenerationConfig | None = None) -> tuple[np.ndarray, list[Turn], int]:
        """The prompt for ``history + user``, dropping the oldest exchanges until it leaves room for an
        answer.  Returns ``(prompt ids, kept history, exchanges dropped)`` without changing the session;
        raises ``ContextError`` when the new turn alone is too long."""
        config = config or self.config
        fmt = self.lm.generator.format
        ctx = self.lm.generator.context_length
        reserve = self.answer_reserve or min(config.max_new_tokens, ctx // 2)
        hist = list(self.history)
        dropped = 0
        while True:
            prompt = fmt.prompt(Conversation(hist + [user], self.system))
            if len(prompt) + reserve <= ctx or not hist:
                break
            hist = hist[2:] if len(hist) >= 2 else []
            dropped += 1
        if len(prompt) + MIN_ANSWER_TOKENS > ctx:
            raise ContextError(f"this turn is {len(prompt)} tokens long; with the model's context of {ctx} there is "
                               f"no room for an answer (shorten the text or the audio)")
        return prompt, hist, dropped

    def respond(self, parts: list[Part], on_event: Callable[[Event], None] | None = None,
                config: GenerationConfig | None = None) -> ChatAnswer:
        """Send ``parts`` as a user turn; returns the answer (its events also go to ``on_event`` as
        they happen: text while it is generated, files once rendered).

        The turn joins the history only when it completes: ``ContextError`` (the turn does not fit),
        an error of the generator or ``KeyboardInterrupt`` leave the session as it was.  A span that
        cannot be rendered becomes an ``error`` event; the rest of the answer stands.
        """
        config = config or self.config
        user = Turn("user", list(parts))
        prompt, hist, dropped = self.fit(user, config)
        events: list[Event] = []

        def emit(e: Event) -> None:
            events.append(e)
            if on_event is not None:
                on_event(e)

        if dropped:
            emit(Event("info", f"context: dropped the oldest {dropped} exchange(s) to stay within "
                               f"{self.lm.generator.context_length} tokens"))
        streamer = EventStreamer(self.lm.tokenizer, self.lm.layout, emit)
        result = self.lm.generator.generate_one(prompt, config, streamer)
        if not any(e.kind in ("text", "span_start", "marker") for e in events):
            emit(Event("info", "empty answer"))
        for issue in result.issues:
            emit(Event("warning", f"malformed output at {issue}"))
        if result.stop == "budget":
            emit(Event("info", f"answer cut at {len(result.ids)} tokens: the token budget or the context ran out"))
        turn_no = self.turn_no + 1
        answer = Turn("assistant", result.parts)
        k = 0
        for part in answer.parts:
            if not isinstance(part, Media):
                continue
            k += 1
            voice = self.voice if part.modality == self.voice_modality else None
            try:
                rendered = self.media.render(part, self.out_dir, f"turn{turn_no:03d}-{k}-{part.modality}", voice=voice)
            except (ValueError, OSError) as e:
                emit(Event("error", f"cannot render the {part.modality} answer: {str(e).splitlines()[0]}",
                           modality=part.modality))
                continue
            self.files[id(part)] = str(rendered.path.resolve())
            for n in rendered.notes:
                emit(Event("note", n, modality=part.modality))
            emit(Event("file", modality=part.modality, path=rendered.path, seconds=rendered.seconds))
        self.turn_no = turn_no
        self.history = hist + [user, answer]
        self.dropped_total += dropped
        return ChatAnswer(events, result, dropped)

    # ------------------------------------------------------------------ views
    def describe_parts(self, parts: Iterable[Part], limit: int = 60) -> str:
        """One line for a turn's parts: text (shortened), ``[image file.png]``, markers."""
        out = []
        for p in parts:
            if isinstance(p, Text):
                t = " ".join(p.text.split())
                out.append(t if len(t) <= limit else t[: limit - 3] + "...")
            elif isinstance(p, Media):
                out.append(f"[{p.modality} {Path(self.files.get(id(p), '')).name or ''}]".replace(" ]", "]"))
            elif isinstance(p, Marker):
                out.append(p.token)
        return " ".join(out)

    def save(self, path: str | Path) -> Path:
        """The conversation as a conversation row (``id``, ``conversation``): media as file paths,
        chain-of-modality markers as ``{"marker": ...}`` (the preprocessing input format)."""
        rows = []
        for turn in self.history:
            content: list[dict[str, str]] = []
            for p in turn.parts:
                if isinstance(p, Text):
                    content.append({"text": p.text})
                elif isinstance(p, Marker):
                    content.append({"marker": p.token})
                elif isinstance(p, Media):
                    content.append({p.modality: self.files.get(id(p), "")})
            rows.append({"role": turn.role, "content": content})
        record: dict[str, Any] = {"id": f"chat-{time.strftime('%Y%m%d-%H%M%S')}", "conversation": rows}
        if self.system:
            record["system"] = self.system
        path = Path(path).expanduser()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        except OSError as e:
            raise OSError(f"cannot save {path}: {e.strerror or e}") from None
        return path


class TerminalChat:
    """The terminal front end: reads command lines, calls the session, prints its events.

    Args:
        session: the conversation.
        out: where answers and messages are printed.
        debug: print tracebacks of unexpected errors.
    """

    def __init__(self, session: ChatSession, out: TextIO | None = None, debug: bool = False) -> None:
        self.session = session
        self.out = out or sys.stdout
        self.debug = debug
        self.pending: list[Part] = []
        self.commands = commands(session.lm.layout)

    @property
    def layout(self) -> VocabLayout:
        return self.session.lm.layout

    # ------------------------------------------------------------------ output helpers
    def say(self, msg: str) -> None:
        print(msg, file=self.out, flush=True)

    def error(self, msg: str) -> None:
        self.say(f"error: {msg}")

    def notes(self, notes: Iterable[str]) -> None:
        for n in notes:
            self.say(f"note: {n}")

    # ------------------------------------------------------------------ dispatch
    def handle(self, line: str) -> bool:
        """Process one input line; returns False when the session should end.

        Never raises for bad input: every failure becomes one message.  ``KeyboardInterrupt`` is
        handled inside generation (the turn is discarded) and otherwise left to the caller.
        """
        try:
            return self._handle(line)
        except (ValueError, OSError) as e:  # our errors: one line naming the file/option
            self.error(str(e).splitlines()[0] if str(e) else type(e).__name__)
        except KeyboardInterrupt:
            raise
        except Exception as e:  # anything else must not end a conversation either
            self.error(f"unexpected {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            if self.debug:
                traceback.print_exc(file=self.out)
        return True

    def _handle(self, line: str) -> bool:
        text = line.rstrip("\r\n")
        stripped = text.strip()
        if not stripped:
            if self.pending:
                self.ask("")
            else:
                self.say("(empty line ignored: type a message, or /help)")
            return True
        if stripped.startswith("//"):
            self.ask(stripped[1:])
            return True
        if not stripped.startswith("/"):
            self.ask(stripped)
            return True
        cmd, _, rest = stripped.partition(" ")
        cmd = cmd.lower()
        if cmd in ("/quit", "/exit"):
            return False
        if cmd == "/help":
            self.say(help_text(self.layout))
        elif cmd[1:] in self.layout.modalities:
            self.attach(cmd[1:], rest)
        elif cmd[1:] in registry.names():
            self.error(no_modality(self.layout, cmd[1:]))
        elif cmd == "/voice":
            self.set_voice(rest.strip())
        elif cmd == "/send":
            if self.pending:
                self.ask(rest.strip())
            else:
                self.say("(nothing to send: attach a file first, or type a message)")
        elif cmd == "/settings":
            self.settings(rest.split())
        elif cmd == "/history":
            self.show_history()
        elif cmd == "/reset":
            self.session.reset()
            self.pending.clear()
            self.say("(conversation cleared; voice and settings kept)")
        elif cmd == "/save":
            path, _ = split_path_arg(rest)
            if not path:
                raise ValueError("/save needs a file name, e.g. /save chat.json")
            self.say(f"saved {self.session.save(path)}")
        else:
            self.error(f"unknown command {cmd} (type /help)")
        return True

    # ------------------------------------------------------------------ commands
    def attach(self, modality: str, rest: str) -> None:
        path, text = split_path_arg(rest)
        if not path:
            raise ValueError(f"/{modality} needs a file path, e.g. /{modality} {example_file(modality)}")
        part, notes = self.session.encode(modality, path)
        self.notes(notes)
        self.pending.append(part)
        self.say(f"(attached {modality} {path}: {self.session.tokens(part)} tokens)")
        if text:
            self.ask(text)
        elif len(self.pending) == 1:
            self.say("(type your message, or an empty line to send the attachment alone)")

    def set_voice(self, arg: str) -> None:
        s = self.session
        if not arg:
            self.say(f"(voice: {s.voice_path or 'none (the decoder picks one)'})")
            return
        if arg.lower() in ("off", "none"):
            s.set_voice(None)
            self.say("(voice prompt removed)")
            return
        path, _ = split_path_arg(arg)
        self.notes(s.set_voice(path))
        self.say(f"({s.voice_modality} answers will use the voice of {path}: {s.voice.shape[1]} frames)")

    def settings(self, overrides: list[str]) -> None:
        s = self.session
        if overrides:
            s.config = replace(s.config, modes=apply_setting_overrides(s.config.modes, overrides))
        for row in settings_table(s.config.modes):
            self.say("  " + "  ".join(f"{k}={v}" for k, v in row.items()))
        self.say(f"  max_new_tokens={s.config.max_new_tokens}  constrained={s.config.constrained}")

    def show_history(self) -> None:
        s = self.session
        if not s.history:
            self.say("(no turns yet)")
        for i, turn in enumerate(s.history):
            self.say(f"  {i + 1:>3} {turn.role:<9} {s.describe_parts(turn.parts)}")
        if s.dropped_total:
            self.say(f"  ({s.dropped_total} earlier exchange(s) dropped to fit the context)")

    def ask(self, text: str) -> None:
        """Send the pending attachments plus ``text`` as a user turn and print the answer as it comes."""
        parts = list(self.pending) + ([Text(text)] if text else [])
        self.pending = []  # a failed or interrupted turn does not leave attachments behind
        printer = ConsolePrinter(self.out)
        started = False

        def show(e: Event) -> None:
            nonlocal started
            if e.kind in ("text", "span_start", "marker", "end") and not started:
                self.out.write("AnyGPT: ")
                started = True
            printer(e)

        try:
            self.session.respond(parts, on_event=show)
        except KeyboardInterrupt:
            self.say("\n(interrupted: the turn was discarded)")


# ---------------------------------------------------------------------------------------------- loop


def _script_lines(source: str, echo: Callable[[str], None]) -> Iterator[str]:
    if source == "-":
        stream = sys.stdin
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")  # a stray binary byte must not end the session
    else:
        stream = open(source, encoding="utf-8", errors="replace")
    try:
        for line in stream:
            line = line.rstrip("\n")
            echo(f"> {line}")
            yield line
    finally:
        if stream is not sys.stdin:
            stream.close()


def _setup_readline(history_file: Path | None, names: tuple[str, ...]) -> Callable[[], None]:
    """Line editing, history and tab completion (commands, then file paths) when readline exists."""
    try:
        import readline
    except ImportError:  # Windows without pyreadline: plain input() still works
        return lambda: None
    import glob

    def complete(text: str, state: int) -> str | None:
        buf = readline.get_line_buffer()
        if buf.startswith("/") and " " not in buf:
            options = [c for c in names if c.startswith(text)]
        else:
            options = [p + ("/" if os.path.isdir(p) else "") for p in glob.glob(os.path.expanduser(text) + "*")]
        return options[state] if state < len(options) else None

    readline.set_completer(complete)
    readline.set_completer_delims(" \t\n\"'")
    readline.parse_and_bind("tab: complete")
    if history_file is not None:
        try:
            readline.read_history_file(str(history_file))
        except OSError:
            pass

    def save() -> None:
        if history_file is not None:
            try:
                history_file.parent.mkdir(parents=True, exist_ok=True)
                readline.set_history_length(1000)
                readline.write_history_file(str(history_file))
            except OSError:
                pass

    return save


def run_chat(session: TerminalChat, script: str | None = None, history_file: Path | None = None,
             read_line: Callable[[str], str] | None = None) -> int:
    """Run the REPL until EOF or ``/quit``; returns the exit status (0).

    Args:
        session: the terminal chat.
        script: ``FILE`` or ``-`` to read lines from a file / stdin (echoed as ``> line``); None for
            interactive input with line editing.
        history_file: readline history for interactive use.
        read_line: replaces ``input`` (tests).
    """
    say = session.say
    if script is not None:
        lines = _script_lines(script, say)

        def reader(prompt: str) -> str:
            try:
                return next(lines)
            except StopIteration:
                raise EOFError from None
    else:
        save_history = _setup_readline(history_file, session.commands) if read_line is None else (lambda: None)
        reader = read_line or input
    try:
        while True:
            try:
                line = reader("you> ")
            except EOFError:
                say("" if script is None else "(end of input)")
                break
            except KeyboardInterrupt:
                say("\n(Ctrl-C: type /quit or press Ctrl-D to leave)")
                continue
            try:
                if not session.handle(line):
                    break
            except KeyboardInterrupt:
                say("\n(interrupted)")
    finally:
        if script is None:
            save_history()
    say("bye")
    return 0
