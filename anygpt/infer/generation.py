"""KV-cached, batched, constrained sampling from the LM, with text streamed as it is generated.

Why our own loop instead of ``model.generate`` with a ``LogitsProcessor``: the sampling settings
change *per row* in the middle of a sequence (a span's start token switches temperature, top-p/k and
repetition penalty for that row only), the constraint state must see every sampled id before the
next step, and the streamer needs span events as well as text.  ``generate`` takes one set of
warpers for the whole batch; a loop of forward calls on the Hugging Face KV cache is short and
keeps all of that in one place.

Batching uses left padding: every prompt ends at the same column, so one forward call per step
advances all rows; position ids restart at each row's first real token, so a padded row computes
exactly what it would alone (up to float rounding).
"""
from __future__ import annotations

import inspect
import random
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence, TextIO

import numpy as np
import torch

from anygpt.formats import FormatIssue, Part, SequenceFormat, Text
from anygpt.infer.constraints import ConstraintMasks, RowState, min_span_ids
from anygpt.infer.settings import GenerationConfig
from anygpt.layout import VocabLayout


_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


class ContextError(ValueError):
    """The prompt leaves no room to generate within the model's context length."""


# ------------------------------------------------------------------------------------------ devices


def pick_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` -> the first CUDA device when there is one, else CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(device: torch.device, dtype: str | torch.dtype | None = "auto") -> torch.dtype:
    """``auto`` -> bf16 on CUDA (fp16 on GPUs without bf16), fp32 on CPU.

    bf16 keeps fp32's exponent range, so the large logits of a 50k-row vocabulary do not overflow
    as they can in fp16; CPU matmuls in bf16 are slower than fp32 on most CPUs, so CPU stays fp32.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    names = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; use auto, fp32, bf16 or fp16")
    return names[dtype]


# ------------------------------------------------------------------------------------------ KV cache


def cache_argument(model: Any) -> str:
    """The ``forward`` keyword that takes the KV cache: ``cache`` in current transformers (5.2x), where
    ``past_key_values`` still works but warns at every call; ``past_key_values`` in older releases."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def new_cache(model: Any) -> Any:
    """An empty ``DynamicCache`` laid out from the model's config (the model fills it in place, so
    the same object is passed back at every step and never read from the output)."""
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


# ------------------------------------------------------------------------------------------ sampling


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """CTRL/HF repetition penalty per row: seen ids' logits are divided (positive) or multiplied
    (negative) by that row's penalty."""
    p = penalty[:, None]
    penalised = torch.where(logits > 0, logits / p, logits * p)
    return torch.where(seen & (p != 1.0), penalised, logits)


def sample_from(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One id per row of ``[B, V]`` probabilities (rows need not sum to 1): inverse-CDF sampling.

    Same distribution as ``torch.multinomial(probs, 1)``, ~20x faster on CPU at V = 18k (multinomial
    normalises and scans each row separately; this is one cumsum and one binary search per row), which
    made sampling, not the model, most of a decode step.  An id with probability 0 is never drawn:
    the draw lies in ``(0, total]`` and the search takes the first id whose cumulative sum reaches it.
    """
    cdf = probs.float().cumsum(dim=-1)
    u = (1.0 - torch.rand((probs.shape[0], 1), generator=generator, device=probs.device)) * cdf[:, -1:]
    return torch.searchsorted(cdf, u).squeeze(1).clamp(max=probs.shape[-1] - 1)


def sample_tokens(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """One id per row from ``[B, V]`` logits with per-row temperature (0 = argmax), top-k and top-p.

    Masked ids must already be ``-inf``; every row must allow at least one id.  Top-k and top-p run
    on the rows that ask for them only (a full-vocabulary sort costs more than the tiny model's step).
    """
    greedy_ids = logits.argmax(dim=-1)
    greedy = temperature <= 0
    if bool(greedy.all()):
        return greedy_ids
    x = logits / torch.where(greedy, torch.ones_like(temperature), temperature)[:, None]
    neg_inf = torch.finfo(x.dtype).min
    rows = (top_k > 0).nonzero().squeeze(1)
    if rows.numel():
        sub, k = x[rows], top_k[rows]
        kmax = int(min(int(k.max()), x.shape[-1]))
        kth = sub.topk(kmax, dim=-1).values.gather(1, (k.clamp(1, kmax) - 1)[:, None])
        x[rows] = sub.masked_fill(sub < kth, neg_inf)
    rows = (top_p < 1.0).nonzero().squeeze(1)
    if rows.numel():
        # Only the ids still allowed can be kept, and a span allows a few thousand of the vocabulary's
        # ids at most: a top-k over that many, not a sort of the whole row (measured: the sort was a
        # sixth of an alignment rollout).
        sub = x[rows]
        allowed = int((sub > neg_inf).sum(dim=-1).max())
        sorted_x, order = sub.topk(max(allowed, 1), dim=-1)
        probs = sorted_x.softmax(dim=-1)
        # Drop an id when the ids more likely than it already reach top_p (the first always stays).
        drop = (probs.cumsum(dim=-1) - probs) >= top_p[rows][:, None]
        x[rows] = torch.full_like(sub, neg_inf).scatter(1, order, sorted_x.masked_fill(drop, neg_inf))
    sampled = sample_from(x.float().softmax(dim=-1), generator)
    return torch.where(greedy, greedy_ids, sampled)


# ------------------------------------------------------------------------------------------ streaming


class Streamer:
    """Receives generation events; turns text ids into text deltas as they arrive.

    Subclasses override ``on_text`` / ``on_span_start`` / ``on_span_end`` / ``on_marker`` /
    ``on_end``.  Text is decoded per text run (between spans/markers), exactly as the parser
    decodes it.  While a run ends in byte-fallback pieces (``<0xE2>``...) nothing is emitted: a
    multi-byte character is not complete yet, and the decoder may still rewrite those bytes.
    """

    def __init__(self, tokenizer: Any, layout: VocabLayout):
        self.tokenizer = tokenizer
        self.layout = layout
        self._runs: dict[int, list[int]] = {}
        self._emitted: dict[int, int] = {}
        self._names = {i: t for t, i in layout.specials.items()}
        self._byte_ids = {i for t, i in tokenizer.get_vocab().items() if _BYTE_PIECE.fullmatch(t)}

    def _emit(self, row: int) -> None:
        run = self._runs.get(row)
        if not run:
            return
        text = self.tokenizer.decode(run, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        done = self._emitted.get(row, 0)
        if len(text) > done:
            self.on_text(row, text[done:])
        self._emitted[row] = len(text)

    def event(self, row: int, event: str | None, token: int, state: RowState) -> None:
        if event is not None and event.startswith("broken:"):
            # Unconstrained only: a span cut off by a text id; that id starts a new text run.
            self.on_span_end(row, event[7:], state.span_ids, broken=True)
            event = "text"
        if event == "text":
            self._runs.setdefault(row, []).append(token)
            if token not in self._byte_ids:
                self._emit(row)
            if not state.done:
                return
            event = None
        self._emit(row)  # the run is over: whatever bytes it ended with are final now
        self._runs.pop(row, None)
        self._emitted.pop(row, None)
        if event is None:
            pass
        elif event.startswith("start:"):
            self.on_span_start(row, event[6:])
        elif event.startswith("end:"):
            self.on_span_end(row, event[4:], state.span_ids)
        elif event == "marker":
            self.on_marker(row, self._names.get(token, str(token)))
        if state.done:
            self.on_end(row, state.stop or "")

    def on_text(self, row: int, text: str) -> None: ...

    def on_span_start(self, row: int, modality: str) -> None: ...

    def on_span_end(self, row: int, modality: str, num_ids: int, broken: bool = False) -> None: ...

    def on_marker(self, row: int, token: str) -> None: ...

    def on_end(self, row: int, stop: str) -> None: ...


@dataclass(frozen=True)
class Event:
    """One piece of an answer, in the order it happened (what the terminal prints, the page shows
    and the API returns or streams).

    Attributes:
        kind: ``text`` (a delta of the answer's text), ``marker`` (a chain-of-modality marker, ``text``
            holds the token), ``span_start`` / ``span_end`` (a media span of ``modality``; ``ids``:
            its length, ``broken``: cut off unconstrained), ``end`` (generation finished, ``text`` holds
            why: eom/budget/...), ``file`` (a generated span written to ``path``, ``seconds`` long),
            ``info`` (a session notice: context trimmed, answer cut), ``note`` (about media: a clip
            cut to the limit, a missing decoder), ``warning`` (malformed output), ``error`` (a span
            that could not be rendered).
    """

    kind: str
    text: str = ""
    modality: str | None = None
    path: Path | None = None
    seconds: float | None = None
    ids: int = 0
    broken: bool = False


class EventStreamer(Streamer):
    """Turns the generation callbacks of row ``row`` into :class:`Event` objects for ``emit``."""

    def __init__(self, tokenizer: Any, layout: VocabLayout, emit: Callable[[Event], None], row: int = 0):
        super().__init__(tokenizer, layout)
        self.emit = emit
        self.row = row

    def on_text(self, row: int, text: str) -> None:
        if row == self.row:
            self.emit(Event("text", text))

    def on_span_start(self, row: int, modality: str) -> None:
        if row == self.row:
            self.emit(Event("span_start", modality=modality))

    def on_span_end(self, row: int, modality: str, num_ids: int, broken: bool = False) -> None:
        if row == self.row:
            self.emit(Event("span_end", modality=modality, ids=num_ids, broken=broken))

    def on_marker(self, row: int, token: str) -> None:
        if row == self.row:
            self.emit(Event("marker", token))

    def on_end(self, row: int, stop: str) -> None:
        if row == self.row:
            self.emit(Event("end", stop))


class ConsolePrinter:
    """Prints events to ``out`` as they come (the terminal's view of an answer).

    Spans show as ``[image ...]`` while they are generated and ``[image 32 ids]`` when closed; the
    chain-of-modality markers start a new line labelled ``(transcript)`` / ``(reply)``; files as
    ``-> image: PATH``; notices as ``(...)``, ``note:``, ``warning:``, ``error:`` lines.
    """

    MARKERS = {"<-Ins->": "(transcript) ", "<-Res->": "(reply) "}
    LINES = {"info": "({})", "note": "note: {}", "warning": "warning: {}", "error": "error: {}"}

    def __init__(self, out: TextIO | None = None):
        self.out = out or sys.stdout
        self.wrote = False  # any of the answer itself (text, spans, markers) was printed

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def __call__(self, e: Event) -> None:
        if e.kind in ("text", "span_start", "span_end", "marker"):
            if e.kind == "text":
                self._write(e.text)
            elif e.kind == "span_start":
                self._write(f"[{e.modality} ")
            elif e.kind == "span_end":
                self._write(f"{e.ids} ids{' (unclosed)' if e.broken else ''}]")
            else:
                self._write(("\n" if self.wrote else "") + self.MARKERS.get(e.text, e.text))
            self.wrote = True
        elif e.kind == "end":
            if self.wrote:
                self._write("\n")
        elif e.kind == "file":
            extra = f" ({e.seconds:.1f} s)" if e.seconds is not None else ""
            self._write(f"-> {e.modality}: {e.path}{extra}\n")
        elif e.kind in self.LINES:
            self._write(self.LINES[e.kind].format(e.text) + "\n")


class ConsoleStreamer(EventStreamer):
    """Prints row ``row`` (default 0) of a generation to ``out`` as it happens (a :class:`ConsolePrinter`)."""

    def __init__(self, tokenizer: Any, layout: VocabLayout, out: TextIO | None = None, row: int = 0):
        self.printer = ConsolePrinter(out)
        super().__init__(tokenizer, layout, self.printer, row)

    @property
    def wrote(self) -> bool:
        return self.printer.wrote


# ------------------------------------------------------------------------------------------ results


@dataclass
class GenerationResult:
    """One generated answer.

    Attributes:
        ids: the answer's ids, without the final stop token.
        stop: why it ended: ``eom``, ``budget`` (max tokens or context), or the stop token that an
            unconstrained model produced (``[Human]``, ``<eoh>``, ``eos`` ...).
        parts: the answer parsed into Text / Media / Marker parts.
        issues: malformed pieces found by the parser (always empty for constrained generation).
        prompt_length: ids in the prompt.
    """

    ids: np.ndarray
    stop: str
    parts: list[Part]
    issues: list[FormatIssue]
    prompt_length: int
    seconds: float = 0.0

    @property
    def finished(self) -> bool:
        return self.stop == "eom"

    @property
    def text(self) -> str:
        """The text parts joined (media parts left out)."""
        return "".join(p.text for p in self.parts if isinstance(p, Text))


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    steps: int = 0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.decode_seconds if self.decode_seconds > 0 else float("nan")


# ------------------------------------------------------------------------------------------ generator


class Generator:
    """Samples answers from a causal LM under the constraints of a vocabulary layout.

    Args:
        model: a Hugging Face causal LM (``LlamaForCausalLM``) whose vocabulary covers the layout.
        tokenizer: its tokenizer (text parts only).
        layout: the vocabulary layout.
        context_length: the longest prompt + answer (default: ``max_position_embeddings``).
    """

    def __init__(self, model: Any, tokenizer: Any, layout: VocabLayout, context_length: int | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.layout = layout
        self.format = SequenceFormat(tokenizer, layout)
        self.context_length = int(context_length or getattr(model.config, "max_position_embeddings", 2048))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        vocab = model.get_output_embeddings().weight.shape[0]
        specials = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id,
                    "unk": tokenizer.unk_token_id, "pad": tokenizer.pad_token_id}
        self.masks = ConstraintMasks(layout, vocab, specials, self.device)
        self._cache_kw = cache_argument(model)
        self.last_seed: int | None = None
        self.last_stats = GenerationStats()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def budget(self, prompt_length: int, config: GenerationConfig) -> int:
        """Ids a prompt of this length may still generate: ``max_new_tokens`` capped by the context.

        Required modalities (``require``/``include``) must fit whole (start, minimal span, end each, then
        ``<eom>``), else ``ContextError``.
        """
        room = self.context_length - prompt_length
        if room < 1:
            raise ContextError(f"the prompt has {prompt_length} tokens and fills the model's context of "
                               f"{self.context_length}")
        budget = min(config.max_new_tokens, room)
        wanted = [config.require] if config.require is not None else list(config.include)
        if config.constrained and wanted:
            need = 1
            for name in wanted:
                m = self.layout.modality(name)
                need += min_span_ids(m) + 2
                if m.span_length is None and config.settings(m.name).max_tokens < min_span_ids(m):
                    raise ValueError(f"{m.name}.max_tokens {config.settings(m.name).max_tokens} is below one frame "
                                     f"({min_span_ids(m)} ids)")
            if budget < need:
                raise ContextError(f"a {' and '.join(wanted)} answer needs {need} tokens but only {budget} are "
                                   f"available (max_new_tokens {config.max_new_tokens}, context {self.context_length})")
        return budget

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Sequence[int] | np.ndarray],
                 config: GenerationConfig | Sequence[GenerationConfig] | None = None,
                 streamer: Streamer | None = None, use_cache: bool = True) -> list[GenerationResult]:
        """Generate one answer per prompt (a batch, one forward call per step).

        Args:
            prompts: id sequences, each ending where the answer begins (``SequenceFormat.prompt``).
            config: one config for all rows or one per row (rows may differ in what they must
                answer: a batch of tasks mixes ``text|image`` and ``speech|text``).
            streamer: receives text deltas and span events as ids are generated.
            use_cache: reuse keys/values of earlier positions (off: recompute the whole sequence
                every step; only for benchmarks and tests, the output is the same).
        """
        if not prompts:
            return []
        b = len(prompts)
        configs = [config or GenerationConfig()] * b if not isinstance(config, (list, tuple)) else list(config)
        if len(configs) != b:
            raise ValueError(f"{len(configs)} configs for {b} prompts")
        rows = [np.asarray(p, dtype=np.int64).reshape(-1) for p in prompts]
        if any(len(r) == 0 for r in rows):
            raise ValueError("empty prompt")
        states = [RowState(config=c, budget=self.budget(len(r), c)) for r, c in zip(rows, configs)]
        device = self.device
        self.masks.to(device)  # the model may have moved since construction
        seed = configs[0].seed
        self.last_seed = seed if seed is not None else random.SystemRandom().randrange(2**63)
        gen = torch.Generator(device=device)
        gen.manual_seed(self.last_seed)

        width = max(len(r) for r in rows)
        ids = torch.full((b, width), self.pad_id, dtype=torch.long)
        attn = torch.zeros((b, width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r):] = torch.from_numpy(r)
            attn[i, width - len(r):] = 1
        ids, attn = ids.to(device), attn.to(device)
        pos = (attn.cumsum(-1) - 1).clamp(min=0)

        vocab = self.masks.vocab_size
        penalised = any(s.repetition_penalty != 1.0 for c in configs for s in c.modes.values())
        seen = None
        if penalised:
            seen = torch.zeros((b, vocab), dtype=torch.bool, device=device)
            seen.scatter_(1, ids, attn.bool())

        out_ids: list[list[int]] = [[] for _ in range(b)]
        stats = GenerationStats(prompt_tokens=int(attn.sum()))
        t0 = time.perf_counter()
        logits, cache = self._forward(ids, attn, pos, None, use_cache)
        stats.prefill_seconds = time.perf_counter() - t0
        t1 = time.perf_counter()
        all_ids, all_pos = ids, pos
        while True:
            keys = [self.masks.key(s) if not s.done else ("eom",) for s in states]
            settings = [s.config.settings(s.mode) for s in states]
            logits = logits.float()
            if seen is not None:
                penalty = torch.tensor([st.repetition_penalty for st in settings], device=device)
                logits = apply_repetition_penalty(logits, seen, penalty)
            logits = logits.masked_fill(~self.masks.masks(keys), float("-inf"))
            temperature = torch.tensor([st.temperature for st in settings], device=device)
            top_k = torch.tensor([st.top_k for st in settings], device=device)
            top_p = torch.tensor([st.top_p for st in settings], device=device)
            next_ids = sample_tokens(logits, temperature, top_k, top_p, gen)
            tokens = next_ids.tolist()
            for i, s in enumerate(states):
                if s.done:
                    tokens[i] = self.pad_id
                    continue
                event = self.masks.advance(s, tokens[i])
                if event != "stop":
                    out_ids[i].append(tokens[i])
                if streamer is not None:
                    streamer.event(i, event, tokens[i], s)
            stats.steps += 1
            if all(s.done for s in states):
                break
            step = torch.tensor(tokens, dtype=torch.long, device=device)[:, None]
            if seen is not None:
                seen.scatter_(1, step, True)
            attn = torch.cat([attn, torch.ones((b, 1), dtype=attn.dtype, device=device)], dim=1)
            step_pos = all_pos[:, -1:] + 1
            all_ids = torch.cat([all_ids, step], dim=1)
            all_pos = torch.cat([all_pos, step_pos], dim=1)
            if use_cache:
                logits, cache = self._forward(step, attn, step_pos, cache, True)
            else:
                logits, _ = self._forward(all_ids, attn, all_pos, None, False)
        stats.decode_seconds = time.perf_counter() - t1
        stats.new_tokens = sum(s.generated for s in states)
        self.last_stats = stats
        results = []
        elapsed = stats.prefill_seconds + stats.decode_seconds
        for r, s, got in zip(rows, states, out_ids):
            parts, issues = self.format.parse_parts(got, start=len(r))
            results.append(GenerationResult(np.asarray(got, dtype=np.int64), s.stop or "budget", parts, issues,
                                            len(r), elapsed))
        return results

    def _forward(self, ids: torch.Tensor, attn: torch.Tensor, pos: torch.Tensor, cache: Any,
                 use_cache: bool) -> tuple[torch.Tensor, Any]:
        if use_cache and cache is None:
            cache = new_cache(self.model)
        extra = {self._cache_kw: cache} if use_cache else {}
        out = self.model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=use_cache,
                         logits_to_keep=1, **extra)
        return out.logits[:, -1, :], cache  # the cache object is updated in place

    # ------------------------------------------------------------------ conveniences
    def generate_one(self, prompt: Sequence[int] | np.ndarray, config: GenerationConfig | None = None,
                     streamer: Streamer | None = None) -> GenerationResult:
        return self.generate([prompt], config, streamer)[0]
