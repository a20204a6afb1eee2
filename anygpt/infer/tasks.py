"""Base-model tasks: ``in|out|content[|voice.wav]`` prompts for a stage-1 (pretrained) model.

A stage-1 model learned text-centric pairs in both directions (``anygpt.formats.pretrain_pair``), so a
task is rendered as exactly such a pair's user turn followed by ``[AnyGPT] ":"``, and the answer is
constrained to what the task asks for: one span of the target modality (text -> X) or text only
(X -> text).  Every modality of the model's layout has both directions, e.g.::

    text|image|a red bus          image|text|photo.png
    text|speech|hello there[|voice.wav]   speech|text|clip.wav

(the trailing voice recording only for the modality that takes a voice prompt).  Several tasks run
as one batch; outputs go to ``--out`` (text answers as ``.txt`` too) and their paths are printed.
A task for a modality the model lacks fails with one line; the others still run.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, TextIO

import numpy as np

from anygpt import modalities as registry
from anygpt.formats import Conversation, FormatIssue, Media, instruction_pool, pretrain_pair
from anygpt.infer.generation import ConsoleStreamer, GenerationResult
from anygpt.infer.mediaio import MediaIO, Rendered, no_modality, slug, unique_path, voice_modality
from anygpt.infer.settings import GenerationConfig
from anygpt.layout import VocabLayout


class TaskError(ValueError):
    """A task string that cannot be run (the message says what is expected)."""


@dataclass(frozen=True)
class Task:
    """One base-model task.

    Attributes:
        source: input modality (``text`` or a media modality).
        target: output modality (``text`` when the source is media).
        content: the text (text -> X) or the media file path (X -> text).
        voice: a recording of the voice to speak in (text -> the voice-prompt modality only).
    """

    source: str
    target: str
    content: str
    voice: str | None = None

    @property
    def modality(self) -> str:
        """The non-text side of the task."""
        return self.target if self.source == "text" else self.source

    @property
    def direction(self) -> str:
        return "text2x" if self.source == "text" else "x2text"

    def __str__(self) -> str:
        return "|".join([self.source, self.target, self.content] + ([self.voice] if self.voice else []))


def parse_task(spec: str, layout: VocabLayout | None = None) -> Task:
    """``in|out|content[|voice.wav]`` -> :class:`Task` (``TaskError`` with the expected forms).

    The modalities are those of ``layout`` (a loaded model) or, before a model is loaded, every
    registered one; a trailing ``|voice.wav`` is read for the modality with a voice prompt.
    """
    media = tuple(layout.modalities) if layout is not None else registry.names()
    parts = spec.split("|")
    if len(parts) < 3:
        m = media[0] if media else "M"
        raise TaskError(f"task {spec!r}: expected in|out|content, e.g. 'text|{m}|a caption' or '{m}|text|FILE'")
    src, dst = parts[0].strip().lower(), parts[1].strip().lower()
    rest = parts[2:]
    voice = None
    if src == "text" and dst == voice_modality(layout) and len(rest) > 1:
        voice = rest[-1].strip() or None
        rest = rest[:-1]
    content = "|".join(rest).strip()
    known = ("text",) + tuple(media)
    for side, name in (("input", src), ("output", dst)):
        if name not in known:
            raise TaskError(f"task {spec!r}: unknown {side} modality {name!r}; use one of {', '.join(known)}")
    if (src == "text") == (dst == "text"):
        forms = ", ".join(f"text|{m}, {m}|text" for m in media)
        raise TaskError(f"task {spec!r}: exactly one side must be text ({forms})")
    if not content:
        raise TaskError(f"task {spec!r}: the content is empty")
    return Task(src, dst, content, voice)


def task_conversation(task: Task, media: Media | None, instruction: str | None = None) -> Conversation:
    """The stage-1 user turn for a task (the assistant turn is what we generate).

    Built with ``pretrain_pair`` and cut after the user turn, so the prompt is token for token what
    the model saw in training.
    """
    m = task.modality
    instruction = instruction or instruction_pool(m, task.direction)[0]
    if task.direction == "x2text":
        if media is None:
            raise TaskError(f"{task}: needs the encoded {m}")
        conv = pretrain_pair(m, media, "", "x2text", instruction=instruction)
    else:
        placeholder = Media(m, np.zeros((1, 0), dtype=np.int64))  # the answer; dropped below
        conv = pretrain_pair(m, placeholder, task.content, "text2x", instruction=instruction)
    return Conversation(conv.turns[:1])


def task_config(task: Task, base: GenerationConfig) -> GenerationConfig:
    """The answer must be one span of the target modality, or text only."""
    from dataclasses import replace

    if task.direction == "text2x":
        return replace(base, outputs=(task.target,), require=task.target)
    return replace(base, outputs=("text",), require=None)


@dataclass
class TaskResult:
    task: Task
    text: str = ""
    files: list[Rendered] = field(default_factory=list)
    text_file: Path | None = None
    issues: list[FormatIssue] = field(default_factory=list)
    stop: str = ""
    error: str | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"task": str(self.task), "text": self.text, "files": [str(f.path) for f in self.files],
                "text_file": str(self.text_file) if self.text_file else None,
                "issues": [str(i) for i in self.issues], "stop": self.stop, "error": self.error,
                "seconds": round(self.seconds, 3)}


def run_tasks(lm: Any, media: MediaIO, tasks: Sequence[Task | str], config: GenerationConfig, out_dir: str | Path,
              samples: int = 1, instruction: str | None = None, out: TextIO | None = None,
              stream: bool = True) -> list[TaskResult]:
    """Run tasks as one batch and write their outputs.

    Args:
        lm: a :class:`~anygpt.infer.loading.LoadedLM`.
        media: encodes input files and renders outputs.
        tasks: :class:`Task` objects or task strings.
        config: sampling settings; each task restricts what its answer may hold.
        out_dir: where outputs go.
        samples: answers per task (rows of the batch).
        instruction: override the instruction (default: the first of the training pool).
        out: where progress and paths are printed (stdout).
        stream: print text as it is generated when the batch has one row.

    Errors in one task (missing file, bad format) are reported in its result; the others still run.
    """
    out = out or sys.stdout
    out_dir = Path(out_dir)
    parsed = [parse_task(t) if isinstance(t, str) else t for t in tasks]
    results: list[TaskResult] = []
    prompts, configs, owners, voices = [], [], [], []
    for task in parsed:
        res = TaskResult(task)
        try:
            if task.modality not in lm.layout.modalities:
                raise TaskError(f"{task}: {no_modality(lm.layout, task.modality)}")
            enc = None
            if task.direction == "x2text":
                enc, notes = media.encode_file(task.modality, task.content)
                for n in notes:
                    print(f"note: {n}", file=out)
            voice = None
            if task.voice:
                voice, notes = media.voice_prompt(task.voice)
                for n in notes:
                    print(f"note: {n}", file=out)
            ids = lm.generator.format.prompt(task_conversation(task, enc, instruction))
        except ValueError as e:
            res.error = str(e).splitlines()[0]
            print(f"error: {res.error}", file=out)
            results.append(res)
            continue
        for k in range(samples):
            r = res if k == 0 else TaskResult(task)
            results.append(r)
            prompts.append(ids)
            configs.append(task_config(task, config))
            owners.append(r)
            voices.append(voice)
    if not prompts:
        return results
    streamer = ConsoleStreamer(lm.tokenizer, lm.layout, out) if stream and len(prompts) == 1 else None
    t0 = time.perf_counter()
    generated = lm.generator.generate(prompts, configs, streamer=streamer)
    gen_seconds = time.perf_counter() - t0
    for res, g, voice in zip(owners, generated, voices):
        _finish(res, g, voice, media, out_dir, out, streamed=streamer is not None)
        res.seconds = gen_seconds
    return results


def _finish(res: TaskResult, g: GenerationResult, voice: np.ndarray | None, media: MediaIO, out_dir: Path,
            out: TextIO, streamed: bool) -> None:
    task = res.task
    res.stop, res.issues = g.stop, g.issues
    for issue in g.issues:
        print(f"warning: {task}: malformed output at {issue}", file=out)
    base = f"{task.source}2{task.target}-" + (slug(task.content) if task.source == "text" else slug(Path(task.content).stem))
    if task.target == "text":
        res.text = g.text.strip()
        if not streamed:
            print(f"{task}: {res.text}", file=out)
        res.text_file = unique_path(out_dir, base, ".txt")
        res.text_file.write_text(res.text + "\n", encoding="utf-8")
        print(f"wrote {res.text_file}", file=out)
        return
    spans = [p for p in g.parts if isinstance(p, Media) and p.modality == task.target]
    if not spans:
        res.error = f"no {task.target} span in the answer (stopped: {g.stop})"
        print(f"error: {task}: {res.error}", file=out)
        return
    try:
        for span in spans:
            rendered = media.render(span, out_dir, base, voice=voice)
            res.files.append(rendered)
            for n in rendered.notes:
                print(f"note: {n}", file=out)
            print(f"wrote {rendered.describe()}", file=out)
    except ValueError as e:
        res.error = str(e).splitlines()[0]
        print(f"error: {task}: {res.error}", file=out)
