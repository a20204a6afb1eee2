"""Prompts, preference pairs, rollouts and the forward passes of alignment.

- :func:`load_prompts`: text->X prompts, each rendered exactly as ``anygpt generate "text|M|..."``
  renders it (:func:`anygpt.infer.tasks.task_conversation`), with the gold codes when they come from
  shards (the data pipeline's pairs, read by the one shard reader through
  :func:`anygpt.eval.real.held_out_pairs`);
- :func:`load_pairs`: offline DPO pairs from a JSONL of conversations;
- :class:`GenerationPolicy`: rollouts.  Generating through a ZeRO-3-partitioned module all-gathers
  every layer's parameters at every forward call, i.e. at every generated token (and every rank must
  then run exactly as many forward calls as the others, or the collectives hang).  Instead each
  rollout first gathers every parameter *once* (``deepspeed.zero.GatheredParameters``, a few tensors
  at a time to bound the peak) into a plain replica of the policy, and then generates on the replica
  with the constrained :class:`~anygpt.infer.generation.Generator`, without collectives: ranks may
  sample answers of different lengths.  The replica costs one unpartitioned copy of the weights per
  rank (what generation needs anyway); ``anygpt bench align`` measures the difference;
- :func:`make_batch` / :func:`token_logprobs`: right-padded micro-batches of prompt + response and
  the log-probabilities of the response tokens (the LM head runs at those positions only, chunked,
  as in training: :func:`anygpt.train.losses.target_cross_entropy`).
"""
from __future__ import annotations

import contextlib
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from anygpt.config import ConfigError
from anygpt.eval.real import held_out_pairs
from anygpt.formats import Conversation, Marker, Media, SequenceFormat, Text, Turn, instruction_pool
from anygpt.infer.generation import GenerationResult, Generator
from anygpt.infer.tasks import Task, task_conversation
from anygpt.layout import LayoutError, VocabLayout
from anygpt.train.losses import IGNORE, target_cross_entropy, target_positions


@dataclass
class Prompt:
    """One text->X prompt: the words / caption, its prompt ids, and the gold answer when known."""

    modality: str
    text: str
    ids: np.ndarray
    gold: np.ndarray | None = None  # [K, T] codes of the layout's codebooks
    key: str = ""


@dataclass
class PreferencePair:
    """Prompt ids and two response id sequences (each ending with the assistant's turn end)."""

    prompt: np.ndarray
    chosen: np.ndarray
    rejected: np.ndarray
    key: str = ""


def prompt_ids(fmt: SequenceFormat, modality: str, text: str, instruction: str | None = None) -> np.ndarray:
    """The ids of the base-model task ``text|modality|text`` (``anygpt generate``'s rendering)."""
    return fmt.prompt(task_conversation(Task("text", modality, text), None, instruction))


def load_prompts(source: Any, fmt: SequenceFormat, layout: VocabLayout, seed: int = 0) -> list[Prompt]:
    """The prompt pool of ``align.prompts`` (:class:`~anygpt.align.config.PromptSource`).

    Unusable items (conversations, modalities the layout lacks or that are not asked for, codes
    outside the layout's range, bad JSON lines) are skipped with one warning line each, counted.
    """
    wanted = [m for m in (source.modalities or layout.modalities) if m in layout.modalities]
    if source.modalities:
        absent = [m for m in source.modalities if m not in layout.modalities]
        if absent:
            raise ConfigError(f"align.prompts.modalities: the model has no {', '.join(absent)} "
                              f"(it has: {', '.join(layout.modalities)})")
    rng = random.Random(seed)
    items: list[tuple[str, str, np.ndarray | None, str]] = []
    if source.shards:
        from anygpt.data.shards import ShardError

        try:
            pairs, reading = held_out_pairs(list(source.shards), layout, wanted, 10**9)
        except ShardError as e:
            raise ConfigError(f"align.prompts.shards: {e}") from None
        for m in wanted:
            k = layout.modality(m).num_codebooks
            items += [(m, text, codes[:k], key) for key, text, codes in pairs[m] if text]
    if source.file:
        path = Path(source.file)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise ConfigError(f"align.prompts.file: cannot read {path} ({e.strerror})") from None
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                m, text = rec["modality"], str(rec["text"]).strip()
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                print(f"warning: {path}:{n}: not a {{\"modality\", \"text\"}} object ({type(e).__name__}); skipped",
                      file=sys.stderr)
                continue
            if m not in wanted or not text:
                print(f"warning: {path}:{n}: modality {m!r} is not one of {wanted} (or the text is empty); skipped",
                      file=sys.stderr)
                continue
            items.append((m, text, None, f"{path.name}:{n}"))
    if source.max_items:
        items = items[: source.max_items]
    out = []
    for m, text, gold, key in items:
        instruction = rng.choice(instruction_pool(m, "text2x")) if source.instruction == "random" else None
        out.append(Prompt(m, text, prompt_ids(fmt, m, text, instruction), gold, key))
    if not out:
        raise ConfigError(f"align.prompts: no usable text->X prompt for {', '.join(wanted)} in "
                          f"{source.shards or source.file}")
    return out


def response_ids(fmt: SequenceFormat, parts: Sequence[Any]) -> np.ndarray:
    """Parts of an assistant answer -> its ids, ending with the assistant's turn end (``<eom>``)."""
    ids = [i for p in parts for i in fmt.part_ids(p)]
    return np.asarray(ids + [fmt.layout.role_id("assistant_end")], dtype=np.int64)


def generated_response(result: GenerationResult, layout: VocabLayout) -> np.ndarray:
    """A generation's ids as a response: with its ``<eom>`` when it ended there."""
    ids = list(result.ids.tolist())
    if result.stop == "eom":
        ids.append(layout.role_id("assistant_end"))
    return np.asarray(ids, dtype=np.int64)


def first_span(result: GenerationResult, modality: str) -> np.ndarray | None:
    spans = [p for p in result.parts if isinstance(p, Media) and p.modality == modality]
    return np.asarray(spans[0].codes, dtype=np.int64) if spans else None


def _parts(value: Any, base: Path, layout: VocabLayout, media: Any, where: str) -> list[Any]:
    """``[{"text": ...} | {"marker": "<-Ins->"} | {M: path} | {M: [[codes]]}]`` -> parts."""
    if isinstance(value, dict) and "content" in value:
        value = value["content"]
    if isinstance(value, str):
        value = [{"text": value}]
    if not isinstance(value, list):
        raise ValueError(f"{where}: expected a list of parts")
    out = []
    for part in value:
        if not isinstance(part, dict) or len(part) != 1:
            raise ValueError(f"{where}: a part is one of {{\"text\": ...}}, {{\"marker\": ...}}, {{modality: file or codes}}")
        (kind, v), = part.items()
        if kind == "text":
            out.append(Text(str(v)))
        elif kind == "marker":
            out.append(Marker(str(v)))
        elif kind in layout.modalities:
            if isinstance(v, list):
                codes = np.asarray(v, dtype=np.int64)
                codes = codes[None] if codes.ndim == 1 else codes
                out.append(Media(kind, codes))
            else:
                if media is None:
                    raise ValueError(f"{where}: {kind} file {v!r} needs the model's codecs (model.codecs)")
                enc, _ = media.encode_file(kind, base / str(v))
                out.append(Media(kind, enc.codes[: layout.modality(kind).num_codebooks]))
        else:
            raise ValueError(f"{where}: unknown part {kind!r} (text, marker, or one of {', '.join(layout.modalities)})")
    return out


def load_pairs(path: str | Path, fmt: SequenceFormat, layout: VocabLayout, media: Any = None) -> list[PreferencePair]:
    """Offline DPO pairs: JSONL lines ``{"id"?, "system"?, "prompt": [turns], "chosen": answer,
    "rejected": answer}`` in the conversation format (turns ``{"role", "content": [parts]}``; an
    answer is a list of parts or an assistant turn).  Media parts are files (relative to the JSONL,
    encoded with the model's codecs) or inline code lists.  A bad line is one warning, skipped."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ConfigError(f"align.dpo.pairs: cannot read {path} ({e.strerror})") from None
    out, bad = [], 0
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            rec = json.loads(line)
            turns = rec["prompt"]
            if isinstance(turns, str):
                turns = [{"role": "user", "content": [{"text": turns}]}]
            conv = Conversation([Turn(t["role"], _parts(t["content"], path.parent, layout, media, where)) for t in turns],
                                system=rec.get("system"))
            if not conv.turns or conv.turns[-1].role != "user":
                raise ValueError(f"{where}: the prompt must end with a user turn")
            chosen = response_ids(fmt, _parts(rec["chosen"], path.parent, layout, media, where))
            rejected = response_ids(fmt, _parts(rec["rejected"], path.parent, layout, media, where))
            out.append(PreferencePair(fmt.prompt(conv), chosen, rejected, str(rec.get("id", where))))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, LayoutError) as e:
            bad += 1
            print(f"warning: {where}: {(str(e).splitlines() or [type(e).__name__])[0]}; skipped", file=sys.stderr)
    if not out:
        raise ConfigError(f"align.dpo.pairs: {path} holds no usable pair ({bad} bad lines)")
    return out


# ---------------------------------------------------------------------------- generation
def _gathered(params: list[torch.nn.Parameter]):
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params)
    return contextlib.nullcontext()


class GenerationPolicy:
    """An unpartitioned replica of the policy that generates rollouts (see the module docstring).

    Build it *before* the DeepSpeed engine (under an active ZeRO-3 config transformers would
    partition it too).

    Args:
        model_dir: the exported model the run starts from.
        tokenizer, layout: the run's.
        device, dtype: where and in what precision rollouts run (the run's).
        lora: the run's LoRA config when enabled (the replica is wrapped the same way, so parameter
            names match the engine's module one to one).
    """

    def __init__(self, model_dir: str | Path, tokenizer: Any, layout: VocabLayout, device: torch.device,
                 dtype: torch.dtype, lora: Any = None, chunk: int = 16):
        from transformers import AutoModelForCausalLM

        from anygpt.model import quiet_transformers

        with quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, local_files_only=True)
        if lora is not None:
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=0.0,
                                                     target_modules=list(lora.target_modules), task_type="CAUSAL_LM"))
        self.model = model.to(device).eval().requires_grad_(False)
        self.generator = Generator(self.model, tokenizer, layout)
        self.chunk = chunk
        self.synced_params = 0

    @torch.no_grad()
    def sync(self, module: torch.nn.Module) -> int:
        """Copy ``module``'s current weights (ZeRO-3 partitioned or not) into the replica, gathering
        each parameter once; every rank must call it.  Returns the parameters copied."""
        mine = dict(self.model.named_parameters())
        theirs = list(module.named_parameters())
        missing = [n for n, _ in theirs if n not in mine]
        if missing:
            raise RuntimeError(f"the generation replica has no parameter {missing[0]!r}")
        for start in range(0, len(theirs), self.chunk):
            part = theirs[start:start + self.chunk]
            with _gathered([p for _, p in part]):
                for name, p in part:
                    mine[name].data.copy_(p.data.to(mine[name].dtype))
        self.synced_params = len(theirs)
        return len(theirs)

    def generate(self, prompts: Sequence[np.ndarray], configs: Sequence[Any], batch_size: int = 64) -> list[GenerationResult]:
        out: list[GenerationResult] = []
        for start in range(0, len(prompts), batch_size):
            out += self.generator.generate(list(prompts[start:start + batch_size]), list(configs[start:start + batch_size]))
        return out


# ---------------------------------------------------------------------------- forward passes
def make_batch(rows: Sequence[tuple[np.ndarray, np.ndarray]], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """``(prompt ids, response ids)`` rows -> right-padded ``input_ids`` / ``attention_mask`` / ``labels``
    (``labels`` hold the response tokens only; the rest is ignored)."""
    width = max(len(p) + len(r) for p, r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, (p, r) in enumerate(rows):
        seq = torch.from_numpy(np.concatenate([p, r]).astype(np.int64))
        ids[i, :len(seq)] = seq
        attn[i, :len(seq)] = 1
        labels[i, len(p):len(seq)] = seq[len(p):]
    return {"input_ids": ids.to(device), "attention_mask": attn.to(device), "labels": labels.to(device)}


def token_logprobs(model: Any, head_owner: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities ``[N]`` of the response tokens of a batch (row-major), and each one's row ``[N]``.

    Args:
        model: what to call (a DeepSpeed engine, or a plain model).
        head_owner: the Hugging Face model whose LM head is restricted to the response positions.
        batch: from :func:`make_batch`.
    """
    labels = batch["labels"]
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    # The losses weight tokens unevenly (advantages, per-sequence sums): not a plain mean.
    logp = -target_cross_entropy(model, head_owner, inputs, labels, plain_mean=False)
    return logp, target_positions(labels).nonzero()[:, 0]
