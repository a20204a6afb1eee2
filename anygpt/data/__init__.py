"""Training and evaluation data: token shards -> rendered examples -> packed, resumable batches.

Pipeline (one per rank, no ``torch.utils.data.DataLoader``; every random choice is a pure function
of the seed and a counter, so the whole position fits in a small JSON-able state)::

    shard spec ──expand──▶ shard list ──per-epoch seeded order, rank split──▶ tar samples
      ──block shuffle (seeded)──▶ render (pretrain pair in a drawn direction | SFT conversation)
      ──weighted mixing of sources──▶ best-fit packing into rows of seq_len ──▶ batch tensors

Public API
----------
``build_train_loader(cfg: TrainConfig, tokenizer, layout, rank: int = 0, world_size: int = 1, *,
batch_size: int | None = None, seed: int | None = None, num_workers: int | None = None,
overlong: "skip" | "truncate" = "skip", attention: "4d" | "segments" = "4d", pack_buffer: int = 64,
mp_context: str | None = None) -> TrainLoader``
    Infinite iterator of batches (cycles over epochs; mixing draws from per-source infinite
    streams, so every rank yields a batch on every call and ZeRO collectives never hang).
    ``batch_size`` defaults to ``cfg.optim.micro_batch_size``, ``seed`` to ``cfg.run.seed``,
    ``num_workers`` to ``cfg.data.num_workers``.

``TrainLoader``
    ``next(loader) -> batch``; ``loader.state_dict() -> dict`` (JSON-serialisable: per source
    epoch / shard cursor / sample offset / position in the shuffle block, the mixer's draw
    counter, the packer's carried-over examples, counters); ``loader.load_state_dict(state)``
    (call before the next ``next``; batches then continue exactly as in an uninterrupted run;
    the same ``world_size`` and sources are required; ``num_workers`` may differ);
    ``loader.stats() -> dict`` (examples, skipped by reason, bad shards, packing efficiency,
    tokens); ``loader.close()`` (stops worker processes; also a context manager).

``build_eval_loader(cfg: TrainConfig, tokenizer, layout, rank: int = 0, world_size: int = 1, *,
shards: str | None = None, batch_size: int | None = None, loss: "assistant" | "all" = "assistant",
attention: "4d" | "segments" = "4d", overlong: "skip" | "truncate" = "skip") -> EvalLoader``
    Finite, one pass per ``iter(loader)`` over ``shards`` (default ``cfg.data.eval_shards``).
    Pretraining pairs are rendered in *both* directions (deterministic instruction per key),
    conversations with assistant-only loss.  Every rank yields the same number of batches
    (``len(loader)``, known after a pass or counted by a dry pass; the last batch group is filled
    with all-padding rows: ``labels`` all -100, ``keys`` empty), so ZeRO-3 forwards stay in step.
    Eval keys end in ``#x2text`` / ``#text2x`` for pairs.  ``loader.last_stats`` after a pass.  ``loss="assistant"``
    scores only the response (the task itself) so per-direction losses mean what they say.

Batch format (both loaders) -- a dict:

- ``input_ids``    ``LongTensor [B, L]``  (``L = cfg.data.seq_len``; padding = ``tokenizer.pad_token_id``)
- ``labels``       ``LongTensor [B, L]``  ids where a token is a training target, else ``-100``
  (padding, non-target tokens, and the first token of every example).  Aligned with
  ``input_ids``: Hugging Face models shift internally (logits at ``t`` predict ``labels[t+1]``).
- ``position_ids`` ``LongTensor [B, L]``  restart at 0 for every packed example; 0 on padding.
- ``attention_mask`` ``BoolTensor [B, 1, L, L]``  True = may attend: causal *within* one example,
  never across examples; padding attends (causally) only to padding, so no query row is fully
  masked (that would give NaN).  Accepted as-is by transformers-5 ``LlamaForCausalLM`` with the ``sdpa`` (default)
  attention; for ``eager`` convert with :func:`to_additive_mask`.  ``None`` when
  ``attention="segments"`` (build it on the GPU with :func:`block_causal_mask` from
  ``segment_ids``, or pass no mask with flash-attention-2, which detects packing from
  ``position_ids``).
- ``segment_ids``  ``LongTensor [B, L]``  0 = padding, 1..n = index of the example in its row.
- ``tasks``        ``LongTensor [B, L]``  per-token task id, names in :func:`task_names` (``0 = "pad"``,
  then ``X2text``/``text2X`` per modality and ``sft``, append-only like the layout: built-in ids
  never move when a plugin adds a modality).  The loss of target ``labels[b, t]`` belongs to
  ``tasks[b, t]``: per-task loss = sum over ``labels != -100`` grouped by task.
- ``keys``         ``list[list[str]]``  per row, ``"source/shard_basename/__key__"`` of each packed
  example (for logging a non-finite loss).

Helpers: :func:`expand_shards` (paths, globs, brace patterns, directories, ``pipe:``/URL specs,
several joined with ``::``), :func:`block_causal_mask`, :func:`to_additive_mask`, :class:`Packer`,
:func:`pack_examples`, :func:`task_names` (also ``TASK_NAMES``), ``anygpt.data.bench.bench_loader() -> dict``.

Shard samples are read through :mod:`anygpt.data.schema`, the one owner of the shard and sample
format (see its docstring); codes are checked against the run's layout (only the first
``num_codebooks`` rows reach the LM).  The sample's *shape* picks the template (pair or
conversation); the source's ``kind`` picks the loss (``pretrain``: ``cfg.data.loss``; ``sft``: assistant
turns only; conversations are always assistant-only).  Bad samples (malformed json, missing or
unreadable npy, out-of-range codes, empty text, too long, anything else that raises) are skipped,
counted by reason (``stats()["skipped_by_reason"]``) and logged with their key (first 20 per reason,
then every 1000th).  A damaged shard (truncated, a tar header corrupted mid-file, fewer samples
than its ``__shard__`` header declares, a newer format version) is logged once with its name, its
readable samples are used, and the run goes on: ``stats()["bad_shards"]`` (url -> message) and
``stats()["lost_samples"]`` (what the headers say could not be read) count it, as does the eval
loader's ``last_stats``.  A source whose whole epoch yields nothing usable raises
:class:`DataError` (instead of spinning forever).

Trainer notes: save ``loader.state_dict()`` of *every* rank (e.g. ``data_state_rank{r}.json`` in
the checkpoint), load it into a freshly built loader before the first ``next``.  Per-task loss:
``per_token = cross_entropy(logits[:, :-1], labels[:, 1:], reduction="none")`` grouped by
``tasks[:, 1:]`` over ``labels[:, 1:] != -100``.  Eval batches may hold rows (or, on some ranks,
whole batches) without targets: sum losses and divide by the target count, never average an
empty batch.

Design decisions (why):

- Examples longer than ``seq_len`` are *skipped* by default (counted as ``too_long``): truncating
  would cut a media span (an image is exactly 32 codes) or an answer in half and teach the model
  broken spans.  ``overlong="truncate"`` keeps the first ``seq_len`` tokens instead.
- Rank split: with at least ``world_size`` shards, rank ``r`` reads shards ``r::world`` of the
  epoch's seeded shard order; with fewer, every rank reads every shard and keeps the samples at
  positions ``(shard_pos + j) % world == r``.  Either way each sample is read once per epoch
  (ranks may differ by a shard's worth per epoch, harmless since streams are infinite; use a
  shard count that is a multiple of the world size for balanced epochs).
- Mixing weights are per *example* (a draw picks a source with probability weight / total), not
  per token.
- Worker processes (``num_workers``) only render (decode npy, tokenize, lay out): samples are
  read and ordered in the main process, so batches are identical for any ``num_workers`` and a
  state saved with one worker count restores with another.
- Shuffling: seeded shard order per epoch, then a seeded permutation of consecutive blocks of
  ``cfg.data.shuffle_buffer`` samples (re-readable from the block start, so exact resume needs no
  buffer contents), then mixing across sources and best-fit packing.
"""
from typing import Any

from anygpt.data.examples import Example, ExampleBuilder, task_names
from anygpt.data.loader import EvalLoader, TrainLoader, build_eval_loader, build_train_loader
from anygpt.data.packing import Packer, block_causal_mask, collate_rows, pack_examples, to_additive_mask
from anygpt.data.shards import ShardError, expand_shards, iter_shard_samples
from anygpt.data.streams import DataError

__all__ = [
    "TASK_NAMES", "task_names", "Example", "ExampleBuilder", "EvalLoader", "TrainLoader", "build_eval_loader",
    "build_train_loader", "Packer", "block_causal_mask", "collate_rows", "pack_examples", "to_additive_mask",
    "ShardError", "expand_shards", "iter_shard_samples", "DataError",
]


def __getattr__(name: str) -> Any:
    if name == "TASK_NAMES":  # follows the registry, see task_names()
        return task_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
