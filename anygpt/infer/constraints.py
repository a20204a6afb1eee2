"""The constraint state machine: which ids may come next so that every answer parses cleanly.

One :class:`RowState` per generated sequence follows the answer token by token: in *text* mode or
inside a span of one modality (with its count of ids so far).  Before each step it names a *key*
(a small tuple: the kind of position the row is at); :class:`ConstraintMasks` turns a key into a
boolean mask over the LM's vocabulary and caches it, so a step costs one dict lookup per row and one
``masked_fill``, whatever the vocabulary size.

Rules (``constrained=True``):

- text mode: text ids, the chain-of-modality markers (free answers only), a modality's start marker (if that modality
  may be answered and the budget still has room for a minimal span, its end and ``<eom>``), and
  ``<eom>`` (not as the very first token: an empty answer is never what a user wants).  Never the
  role/turn tokens, BOS/EOS/UNK, a stray end marker or a bare modality id;
- inside a span: only that modality's ids, and its end marker where the span may end:
  image spans are exactly ``span_length`` (32) codes; multi-codebook spans (music) follow the
  codebook cycle (the id at position ``n`` must come from codebook ``n % K``) and end only on a frame
  boundary; other spans (speech) end anywhere after one id;
- a span is capped at its mode's ``max_tokens`` and at what the budget leaves for closing it, so
  even a budget cut yields a closed span and a final ``<eom>``;
- ``require=M``: the answer is exactly ``<so*> ... <eo*> <eom>`` of modality ``M``;
- ``include=(M, ...)``: the answer holds at least one span of each (text may come first, as in the
  OpenAI API's ``modalities: ["text", "audio"]``): ``<eom>`` is masked until each was opened, room
  for them is kept, and a span start is forced when the budget has only that room left.

Unconstrained (``constrained=False``) the state machine still runs, to switch sampling settings at
span starts, but masks nothing except stop tokens before ``min_new_tokens``; whatever malformed
output the model produces is left for the parser to report.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Hashable

import torch

from anygpt.infer.settings import GenerationConfig
from anygpt.layout import ModalitySpec, VocabLayout

TEXT = "text"


def min_span_ids(m: ModalitySpec) -> int:
    """Fewest ids a well-formed span body of ``m`` holds (a fixed-length span: all of it; several
    codebooks per frame: one frame; else one id)."""
    return m.span_length * m.num_codebooks if m.span_length is not None else m.num_codebooks


@dataclass
class RowState:
    """Where one generated sequence is; updated by :meth:`ConstraintMasks.advance` after every token."""

    config: GenerationConfig
    budget: int  # most ids this row may generate (max_new_tokens capped by the context)
    mode: str = TEXT  # "text" or a modality name
    span_ids: int = 0  # ids generated in the current span
    span_cap: int = 0  # most ids the current span may hold
    text_tokens: int = 0  # text tokens (and markers) in this answer
    generated: int = 0
    spans: list[str] = field(default_factory=list)  # modalities of the spans opened so far
    done: bool = False
    stop: str | None = None  # why the row finished: eom | budget | stop token name

    @property
    def remaining(self) -> int:
        return self.budget - self.generated


class ConstraintMasks:
    """Vocabulary masks for the constraint keys of one layout and one logits width (cached per device).

    Args:
        layout: the vocabulary layout.
        vocab_size: width of the model's logits (may exceed ``layout.total`` when the embedding
            matrix was padded; those ids are never allowed).
        special_text_ids: name -> id of the tokenizer's own specials inside the text range (``bos``,
            ``eos``, ``unk``, ``pad``): never sampled in constrained text; ``eos`` also ends an
            unconstrained answer.
        device: where masks live (the logits' device).
    """

    def __init__(self, layout: VocabLayout, vocab_size: int, special_text_ids: dict[str, int | None],
                 device: torch.device | str = "cpu") -> None:
        if vocab_size < layout.total:
            raise ValueError(f"model has {vocab_size} logits but the layout needs {layout.total}")
        self.layout = layout
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.eom = layout.role_id("assistant_end")
        self.start_of = {m.name: layout.id(m.start) for m in layout.modalities.values()}
        self.end_of = {m.name: layout.id(m.end) for m in layout.modalities.values()}
        self.modality_of_start = {v: k for k, v in self.start_of.items()}
        self.markers = [layout.specials[t] for t in ("<-Ins->", "<-Res->") if t in layout.specials]
        self.special_text_ids = {int(i) for i in special_text_ids.values()
                                 if i is not None and 0 <= int(i) < layout.base_vocab_size}
        # Tokens that end an *unconstrained* answer: our turn end, and anything that shows the model
        # moved on to another turn (the parser would flag them inside a turn anyway).
        self.stop_ids = {self.eom: "eom", layout.role_id("user"): layout.roles["user"],
                         layout.role_id("user_end"): layout.roles["user_end"],
                         layout.role_id("assistant"): layout.roles["assistant"]}
        if special_text_ids.get("eos") is not None:
            self.stop_ids.setdefault(int(special_text_ids["eos"]), "eos")
        self._cache: dict[Hashable, torch.Tensor] = {}

    def to(self, device: torch.device | str) -> "ConstraintMasks":
        device = torch.device(device)
        if device != self.device:
            self.device = device
            self._cache.clear()
        return self

    # ------------------------------------------------------------------ keys
    def key(self, s: RowState) -> Hashable:
        """The kind of position row ``s`` is at; equal keys share one cached mask."""
        cfg = s.config
        allow_stop = s.generated >= max(1, cfg.min_new_tokens)
        if not cfg.constrained:
            return ("free", allow_stop)
        r = s.remaining
        if s.mode != TEXT:
            m = self.layout.modalities[s.mode]
            n = s.span_ids
            if n >= s.span_cap:
                return ("end", s.mode)
            k = m.num_codebooks
            can_end = n > 0 and n % k == 0 and (m.span_length is None or n == m.span_length * k)
            return ("span", s.mode, n % k if k > 1 else 0, can_end)
        # Text mode.  The last id of the budget is always <eom>.
        if r <= 1 or (cfg.require is not None and s.spans):
            return ("eom",)
        if cfg.require is not None:
            return ("start", cfg.require)
        needed = self.needed(s)
        if needed and r <= self._reserve(s):
            return ("start", needed[0])  # the last moment a required span still fits whole
        outputs = cfg.outputs
        starts = tuple(sorted(
            name for name, m in self.layout.modalities.items()
            if (outputs is None or name in outputs) and r - self._reserve(s, name) >= min_span_ids(m) + 3
            and self._span_limit(s, m, r - 1) >= min_span_ids(m)
        ))
        allow_text = (outputs is None or TEXT in outputs) and s.text_tokens < cfg.settings(TEXT).max_tokens
        if not allow_text and not starts:
            return ("eom",)
        allow_stop = allow_stop and not needed
        # Chain-of-modality markers belong to free (chat) answers, not to a task's plain text.
        return ("text", allow_text, allow_text and outputs is None, starts, allow_stop)

    def needed(self, s: RowState) -> list[str]:
        """The modalities of ``config.include`` that row ``s`` has not opened a span of yet."""
        return [n for n in s.config.include if n not in s.spans]

    def _reserve(self, s: RowState, opening: str | None = None) -> int:
        """Ids the still-needed spans take at least (start, minimal body, end each) plus ``<eom>``,
        leaving out the span of ``opening`` (the one being opened now).  0 when none is needed."""
        rest = [n for n in self.needed(s) if n != opening]
        if not rest:
            return 0
        return sum(min_span_ids(self.layout.modalities[n]) + 2 for n in rest) + 1

    def _span_limit(self, s: RowState, m: ModalitySpec, remaining_after_start: int) -> int:
        """Most ids a span of ``m`` opened now may hold: its setting, minus room for end + ``<eom>``."""
        if m.span_length is not None:
            return m.span_length * m.num_codebooks
        cap = min(s.config.settings(m.name).max_tokens, remaining_after_start - 2 - self._reserve(s, m.name))
        return cap - cap % m.num_codebooks

    # ------------------------------------------------------------------ masks
    def mask(self, key: Hashable) -> torch.Tensor:
        """Boolean ``[vocab_size]`` mask (True = allowed) for a key."""
        t = self._cache.get(key)
        if t is None:
            t = self._build(key).to(self.device)
            self._cache[key] = t
        return t

    def masks(self, keys: list[Hashable]) -> torch.Tensor:
        """``[B, vocab_size]`` masks for a batch of keys."""
        if len(keys) == 1:
            return self.mask(keys[0])[None]
        return torch.stack([self.mask(k) for k in keys])

    def _build(self, key: Any) -> torch.Tensor:
        v = torch.zeros(self.vocab_size, dtype=torch.bool)
        kind = key[0]
        if kind == "free":
            v[: self.layout.total] = True
            if not key[1]:
                for tid in self.stop_ids:
                    v[tid] = False
            return v
        if kind == "eom":
            v[self.eom] = True
        elif kind == "start":
            v[self.start_of[key[1]]] = True
        elif kind == "end":
            v[self.end_of[key[1]]] = True
        elif kind == "span":
            _, name, book, can_end = key
            m = self.layout.modalities[name]
            lo = m.offset + book * m.codebook_size
            hi = lo + m.codebook_size if m.num_codebooks > 1 else m.stop
            v[lo:hi] = True
            if can_end:
                v[self.end_of[name]] = True
        elif kind == "text":
            _, allow_text, allow_markers, starts, allow_stop = key
            if allow_text:
                v[: self.layout.base_vocab_size] = True
                for tid in self.special_text_ids:
                    v[tid] = False
            if allow_markers:
                for tid in self.markers:
                    v[tid] = True
            for name in starts:
                v[self.start_of[name]] = True
            if allow_stop or not v.any():
                v[self.eom] = True
        else:  # pragma: no cover - keys are built above
            raise ValueError(f"unknown constraint key {key!r}")
        return v

    # ------------------------------------------------------------------ transitions
    def advance(self, s: RowState, token: int) -> str | None:
        """Record ``token`` in row ``s``; returns an event name for streamers.

        Events: ``text``, ``marker``, ``start:<modality>``, ``code``, ``end:<modality>``, ``stop``,
        ``broken:<modality>`` (unconstrained only: a span interrupted by a foreign id).
        """
        s.generated += 1
        event: str | None
        if s.mode != TEXT:
            m = self.layout.modalities[s.mode]
            if m.offset <= token < m.stop:
                s.span_ids += 1
                event = "code"
            elif token == self.end_of[s.mode]:
                event = f"end:{s.mode}"
                s.mode = TEXT
            else:  # only reachable unconstrained: the span is malformed, the parser will say so
                broken = f"broken:{s.mode}"
                s.mode = TEXT
                event = self._text_token(s, token, broken)
        else:
            event = self._text_token(s, token, None)
        if not s.done and s.generated >= s.budget:
            s.done, s.stop = True, "budget"
        return event

    def _text_token(self, s: RowState, token: int, prefix_event: str | None) -> str:
        if token in self.stop_ids and (token == self.eom or not s.config.constrained):
            s.done, s.stop = True, self.stop_ids[token]
            return "stop"
        if token in self.modality_of_start:
            name = self.modality_of_start[token]
            m = self.layout.modalities[name]
            s.mode, s.span_ids = name, 0
            s.span_cap = self._span_limit(s, m, s.remaining) if s.config.constrained else \
                s.config.settings(name).max_tokens
            s.spans.append(name)
            return f"start:{name}"
        s.text_tokens += 1
        if token in self.markers:
            return "marker"
        return prefix_event or "text"

