"""The served model: one LM, one lock, a bounded queue, size limits and a temporary directory.

Every turn of every front end (API request, page message) runs inside :meth:`Engine.turn`: turns
take the model one at a time (a CPU or one GPU gains nothing from interleaving two generations, and
the lazily loaded codecs are not thread-safe), and when ``queue`` turns are already waiting a new
one is refused at once with :class:`Busy` rather than piling up.  Uploaded and generated files live
under one per-server temporary directory, removed when the server stops.
"""
from __future__ import annotations

import shutil
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, Mapping

from anygpt.formats import Turn
from anygpt.infer.chat import ChatSession
from anygpt.infer.mediaio import MediaIO
from anygpt.infer.settings import GenerationConfig
from anygpt.serve.limits import Limits


class Busy(RuntimeError):
    """Too many turns are already waiting for the model."""


class Engine:
    """One loaded model and what every front end shares.

    Args:
        lm: a :class:`~anygpt.infer.loading.LoadedLM`.
        media: its codecs and renderers.
        config: the server's sampling defaults (requests change temperature, top-p, token limits).
        model_id: the name ``/v1/models`` lists (requests must name it).
        system: system prompt for conversations that bring none.
        media_root: the only directory ``file:`` URLs may point into (None: no ``file:`` URLs).
        limits: size and queue limits.
        workdir: the per-server temporary directory (default: a fresh one, removed by :meth:`close`).
    """

    def __init__(self, lm: Any, media: MediaIO, config: GenerationConfig, model_id: str,
                 system: str | None = None, media_root: str | Path | None = None, limits: Limits = Limits(),
                 workdir: str | Path | None = None) -> None:
        self.lm = lm
        self.media = media
        self.config = config
        self.model_id = model_id
        self.system = system
        self.media_root = Path(media_root).expanduser().resolve() if media_root is not None else None
        self.limits = limits
        self._own_workdir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="anygpt-serve-")) if workdir is None else Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._count = threading.Lock()
        self._waiting = 0

    @property
    def layout(self):
        return self.lm.layout

    def scratch(self, kind: str) -> Path:
        """A fresh directory under the server's temporary directory (one per request or page session)."""
        base = self.workdir / kind
        base.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(dir=base))

    def session(self, out_dir: Path, history: list[Turn] | None = None, system: str | None = None) -> ChatSession:
        """A conversation on this model writing its media under ``out_dir``."""
        return ChatSession(self.lm, self.media, self.config, out_dir, system=system or self.system, history=history)

    @contextmanager
    def turn(self) -> Iterator[None]:
        """Hold the model for one turn (waits for the turns before it; ``Busy`` when the queue is full)."""
        with self._count:
            if self._waiting >= self.limits.queue + 1:  # the one running plus `queue` waiting
                raise Busy(f"the server is busy ({self.limits.queue} requests waiting); try again shortly")
            self._waiting += 1
        try:
            with self._lock:
                yield
        finally:
            with self._count:
                self._waiting -= 1

    def close(self) -> None:
        """Remove the temporary directory (uploads, generated media) when this engine made it."""
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


def turn_config(base: GenerationConfig, temperature: float | None = None, top_p: float | None = None,
                max_new_tokens: int | None = None, max_tokens: Mapping[str, int] | None = None,
                seed: int | None = None, outputs: tuple[str, ...] | None = None,
                include: tuple[str, ...] = ()) -> GenerationConfig:
    """``base`` with one turn's settings: temperature and top-p for every mode (text and each
    modality, as ``--set all.temperature=``), the answer's token budget (at most the server's),
    a per-mode ``max_tokens``, what the answer may / must hold.  Bad values raise ``ValueError``."""
    modes = dict(base.modes)
    for name, settings in modes.items():
        change: dict[str, Any] = {}
        if temperature is not None:
            change["temperature"] = float(temperature)
        if top_p is not None:
            change["top_p"] = float(top_p)
        if max_tokens and name in max_tokens:
            change["max_tokens"] = int(max_tokens[name])
        if change:
            modes[name] = replace(settings, **change)
    budget = base.max_new_tokens if max_new_tokens is None else min(int(max_new_tokens), base.max_new_tokens)
    if budget < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_new_tokens}")
    return replace(base, modes=modes, max_new_tokens=budget, seed=base.seed if seed is None else int(seed),
                   outputs=outputs, include=tuple(include))
