"""``anygpt bench train``: what the trainer costs over a bare DeepSpeed loop, and whether data keeps up.

Three numbers on the same engine, model and batch shape (one rank, in this process):

- trainer step: :meth:`Trainer.train_step` (loader, forward, per-modality/task loss breakdown,
  non-finite guard, backward, step, stats all-reduce);
- bare step: ``loss = engine(**batch, labels=...).loss; engine.backward(loss); engine.step()`` on one
  fixed batch (the floor any trainer pays);
- loader: batches/s and tokens/s of ``next(loader)`` alone, against the tokens/s training consumes;
- LM head only at targets: the bare step again with response-only labels (what stage 2 trains on),
  once with full ``[B, L, V]`` logits and once under :func:`~anygpt.train.losses.logits_only_at`, so
  the ratio is the saving of computing the head only where there is a target; and a third time through
  the chunked head and loss (:func:`~anygpt.train.losses.head_loss_at`, what the trainer does), against
  the ``[N, V]`` logits at the targets.

Also :func:`synthetic_corpus` (tiny tokenizer + shards written through :mod:`anygpt.data.schema`, code
shapes from the codec cards), used by the benchmark and the training tests.

:func:`bench_attention` (also part of ``anygpt bench train``) compares the packed-row attention paths at
seq_len 2048: mask bytes per step, forward and step time, numbers against the 4-D mask.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from anygpt import modalities as registry
from anygpt.data.bench import random_media, write_samples
from anygpt.data.schema import encode_sample

WORDS = ("a red blue green circle square triangle on the left right top bottom speaker says hello world "
         "slow fast song piano guitar cheerful sad picture of two three dogs cats").split()


def _text(rng: np.random.Generator, lo: int = 3, hi: int = 8) -> str:
    return " ".join(rng.choice(WORDS, int(rng.integers(lo, hi))))


def pair_sample(rng: np.random.Generator, key: str, modality: str,
                frames: tuple[int, int] = (4, 16)) -> tuple[str, list, dict]:
    """A stage-1 pair (:func:`~anygpt.data.schema.encode_sample` output) with random codes shaped by the
    modality's codec card; ``frames``: range of frames of timed media (fixed-length spans keep theirs)."""
    return encode_sample(id=key, kind="pair", media=[random_media(rng, modality, frames)], source="manifest",
                         text=_text(rng))


def conversation_sample(rng: np.random.Generator, key: str) -> tuple[str, list, dict]:
    """A 4-turn dialogue: media of one registered modality asked about, media of another one answered."""
    mods = registry.names()
    asked, answered = (mods[int(i)] for i in rng.choice(len(mods), 2, replace=len(mods) < 2))
    conv = [{"role": "user", "content": [{"text": _text(rng)}, {"media": 0}]},
            {"role": "assistant", "content": [{"marker": "<-Ins->"}, {"text": _text(rng)},
                                              {"marker": "<-Res->"}, {"text": _text(rng)}]},
            {"role": "user", "content": [{"text": _text(rng)}]},
            {"role": "assistant", "content": [{"text": _text(rng)}, {"media": 1}]}]
    return encode_sample(id=key, kind="conversation", source="conversations", conversation=conv,
                         media=[random_media(rng, asked, (4, 16)), random_media(rng, answered, (4, 16))])


def synthetic_corpus(root: str | Path, pairs: int = 64, conversations: int = 32, eval_pairs: int = 8,
                     per_shard: int = 8, seed: int = 0, tokenizer: bool = True,
                     frames: tuple[int, int] = (4, 16)) -> dict[str, str]:
    """A tiny tokenizer and pair/conversation/eval shards under ``root``; returns their paths/patterns.

    Pairs cycle through the registered modalities.  Keys: ``tokenizer`` (dir), ``pairs``, ``sft``,
    ``eval`` (shard globs).  ``frames``: range of frames per timed media item of a training pair.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    mods = registry.names()
    write_samples(root / "pairs", "pairs", [pair_sample(rng, f"p{i:05d}", mods[i % len(mods)], frames)
                                            for i in range(pairs)], per_shard)
    write_samples(root / "sft", "sft", [conversation_sample(rng, f"c{i:05d}") for i in range(conversations)],
                  per_shard)
    write_samples(root / "eval", "eval", [pair_sample(rng, f"e{i:05d}", mods[i % len(mods)])
                                          for i in range(eval_pairs)], max(1, eval_pairs // 2))
    out = {"pairs": str(root / "pairs" / "*.tar"), "sft": str(root / "sft" / "*.tar"),
           "eval": str(root / "eval" / "*.tar")}
    if tokenizer:
        from anygpt.text_tokenizer import prepare_tokenizer, train_tiny_tokenizer

        texts = [_text(rng, 3, 12) for _ in range(400)] + [" ".join(WORDS)] * 5
        raw = train_tiny_tokenizer(texts, root / "tokenizer_raw", vocab_size=320)
        prepare_tokenizer(raw, root / "tokenizer")
        out["tokenizer"] = str(root / "tokenizer")
    return out


def _mean_time(fn, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def bench_train(steps: int = 10, seq_len: int = 256, micro_batch_size: int = 4, warmup: int = 2,
                repeats: int = 3, model: str = "tiny", workdir: str | Path | None = None,
                verbose: bool = True) -> dict[str, Any]:
    """Trainer step vs bare DeepSpeed step (ratio) and loader vs training throughput, on one rank.

    Returns a dict (times in seconds, throughputs in tokens/s); prints a short table when ``verbose``.
    """
    from anygpt.config import load_train_config
    from anygpt.train.loop import Trainer
    from anygpt.train.losses import IGNORE, head_loss_at, logits_only_at, target_ids, target_positions

    tmp = tempfile.TemporaryDirectory(prefix="anygpt-bench-train-") if workdir is None else None
    root = Path(workdir or tmp.name)
    try:
        corpus = synthetic_corpus(root / "data", pairs=96, conversations=0, eval_pairs=0)
        cfg = load_train_config(None, base={
            "run": {"dir": str(root / "run"), "max_steps": warmup + repeats * steps + 1, "save_every": 10**6,
                    "log_every": 10**6, "progress": False, "tensorboard": False},
            "model": {"name": model, "tokenizer": corpus["tokenizer"]},
            "data": {"sources": [{"name": "pairs", "shards": corpus["pairs"]}], "seq_len": seq_len},
            "optim": {"micro_batch_size": micro_batch_size, "warmup_steps": 1},
        })
        trainer = Trainer(cfg).setup()
        engine = trainer.engine
        batch = next(trainer.loader)
        inputs = trainer._inputs(batch)
        labels = batch["labels"].to(trainer.rt.device)

        def bare() -> None:
            out = engine(**inputs, labels=labels)
            engine.backward(out.loss)
            engine.step()

        # Response-only labels: the head's cost depends only on how many positions have a target, so
        # keeping the targets of the last 30 % of each row stands for "answers only".
        answer = labels.clone()
        answer[:, : int(labels.shape[1] * 0.7)] = IGNORE
        head_at = target_positions(answer)

        def full_head() -> None:
            loss = trainer.loss_fn(engine(**inputs).logits, answer)[0]
            engine.backward(loss)
            engine.step()

        def head_at_targets() -> None:
            with logits_only_at(engine.module, head_at):
                logits = engine(**inputs).logits
            engine.backward(trainer.loss_fn(logits, answer)[0])
            engine.step()

        def chunked_head() -> None:
            with head_loss_at(engine.module, head_at, target_ids(answer, head_at)):
                ce = engine(**inputs).logits
            engine.backward(trainer.loss_fn.reduce(ce, answer)[0])
            engine.step()

        for _ in range(warmup):
            trainer.train_step()
            bare()
        # Interleaved blocks, best of each: on a shared machine the noise between two back-to-back
        # measurements is larger than the difference being measured.
        trainer_s = bare_s = full_s = targets_s = chunked_s = float("inf")
        train_tps = 0.0
        for _ in range(repeats):
            tokens_before = trainer.tokens
            t = _mean_time(trainer.train_step, steps)
            if t < trainer_s:
                trainer_s, train_tps = t, (trainer.tokens - tokens_before) / (t * steps)
            bare_s = min(bare_s, _mean_time(bare, steps))
            full_s = min(full_s, _mean_time(full_head, steps))
            targets_s = min(targets_s, _mean_time(head_at_targets, steps))
            chunked_s = min(chunked_s, _mean_time(chunked_head, steps))

        n_batches = 4 * steps
        t0 = time.perf_counter()
        tok = sum(trainer._input_tokens(next(trainer.loader)) for _ in range(n_batches))
        loader_s = time.perf_counter() - t0
        stats = trainer.loader.stats()
        trainer.loader.close()
        trainer.logger.close()
        result = {
            "model": model, "params": trainer.bundle.total_params, "seq_len": seq_len,
            "micro_batch_size": micro_batch_size, "world_size": trainer.rt.world_size,
            "device": trainer.rt.device.type, "steps": steps, "repeats": repeats,
            "trainer_step_s": trainer_s, "bare_step_s": bare_s, "overhead_ratio": trainer_s / bare_s,
            "train_tokens_per_s": train_tps, "loader_batches_per_s": n_batches / loader_s,
            "loader_tokens_per_s": tok / loader_s, "loader_headroom": (tok / loader_s) / max(train_tps, 1e-9),
            "packing_efficiency": stats.get("packing_efficiency"),
            "target_fraction": float(head_at.float().mean()), "full_head_step_s": full_s,
            "head_at_targets_step_s": targets_s, "head_at_targets_speedup": full_s / targets_s,
            "chunked_head_step_s": chunked_s, "chunked_head_speedup": targets_s / chunked_s,
        }
        if verbose:
            print(f"bench train ({model}, {result['params'] / 1e6:.2f}M params, {micro_batch_size}x{seq_len} tokens, "
                  f"{result['device']}, 1 rank)")
            print(f"  trainer step      {trainer_s * 1e3:9.1f} ms")
            print(f"  bare DeepSpeed    {bare_s * 1e3:9.1f} ms   ratio trainer/bare {result['overhead_ratio']:.2f}")
            print(f"  training consumes {train_tps:9.0f} tokens/s")
            print(f"  loader alone      {result['loader_tokens_per_s']:9.0f} tokens/s "
                  f"({result['loader_batches_per_s']:.1f} batches/s, headroom x{result['loader_headroom']:.1f})")
            print(f"  response-only loss ({result['target_fraction']:.0%} of positions are targets): full LM head "
                  f"{full_s * 1e3:.1f} ms, head at targets {targets_s * 1e3:.1f} ms, "
                  f"speed-up x{result['head_at_targets_speedup']:.2f}; chunked head and loss {chunked_s * 1e3:.1f} ms, "
                  f"x{result['chunked_head_speedup']:.2f} over the logits at the targets")
        return json.loads(json.dumps(result, default=float))
    finally:
        if tmp is not None:
            tmp.cleanup()


def bench_codecs_train(seconds: float = 10.0, examples: int = 4, steps: int = 3, repeats: int = 2,
                       model: str = "tiny", workdir: str | Path | None = None,
                       verbose: bool = True) -> dict[str, Any]:
    """Step time for the same seconds of audio under each codec of every transcribed modality (speech:
    SpeechTokenizer's 50 LM positions per second against Mimi's 12.5).

    Every step trains on ``examples`` pairs of ``seconds`` of audio plus their transcripts, one pair per
    row, rows just long enough for the longest; only the codec (its card: frame rate, ``lm_codebooks``,
    codebook size, hence the layout) differs between the runs.
    """
    from anygpt.config import load_train_config
    from anygpt.modalities.cards import write_card
    from anygpt.text_tokenizer import prepare_tokenizer, train_tiny_tokenizer
    from anygpt.train.loop import Trainer

    tmp = tempfile.TemporaryDirectory(prefix="anygpt-bench-codecs-") if workdir is None else None
    root = Path(workdir or tmp.name)
    rows = []
    try:
        rng = np.random.default_rng(0)
        raw = train_tiny_tokenizer([_text(rng, 3, 12) for _ in range(400)] + [" ".join(WORDS)] * 5,
                                   root / "tokenizer_raw", vocab_size=320)
        for plugin in registry.registered().values():
            if plugin.text_kind != "transcript":
                continue
            for name in registry.codec_names(plugin.name):
                card = registry.codec_card(plugin.name, name)
                if not card.get("frame_rate"):
                    continue
                run = root / name
                write_card(card, run / "codecs" / plugin.name)  # the card alone sizes the layout
                prepare_tokenizer(raw, run / "tokenizer", cards={plugin.name: card})
                frames = int(round(seconds * float(card["frame_rate"])))
                samples = [encode_sample(id=f"p{i}", kind="pair", source="bench", text=_text(rng),
                                         media=[random_media(rng, plugin.name, (frames, frames + 1), card=card)])
                           for i in range(examples * 4)]
                write_samples(run / "data", "pairs", samples, examples)
                positions = frames * int(card["lm_codebooks"])
                seq_len = (positions + 128 + 63) // 64 * 64  # one pair per row: the span, its markers, the prompt
                cfg = load_train_config(None, base={
                    "run": {"dir": str(run / "run"), "max_steps": 1 + repeats * steps + 1, "save_every": 10**6,
                            "log_every": 10**6, "progress": False, "tensorboard": False},
                    "model": {"name": model, "tokenizer": str(run / "tokenizer"), "codecs": str(run / "codecs")},
                    "data": {"sources": [{"name": "pairs", "shards": str(run / "data" / "*.tar")}],
                             "seq_len": seq_len},
                    "optim": {"micro_batch_size": examples, "warmup_steps": 1},
                })
                trainer = Trainer(cfg).setup()
                trainer.train_step()  # warm-up
                step_s = min(_mean_time(trainer.train_step, steps) for _ in range(repeats))
                trainer.loader.close()
                trainer.logger.close()
                rows.append({"modality": plugin.name, "codec": name, "seconds_per_example": seconds,
                             "examples_per_step": examples, "lm_positions_per_second": positions / seconds,
                             "seq_len": seq_len, "step_s": round(step_s, 4)})
    finally:
        if tmp is not None:
            tmp.cleanup()
    by_modality: dict[str, list] = {}
    for r in rows:
        by_modality.setdefault(r["modality"], []).append(r)
    for group in by_modality.values():
        slowest = max(r["step_s"] for r in group)
        for r in group:
            r["step_speedup_vs_slowest"] = round(slowest / r["step_s"], 2)
    if verbose:
        for r in rows:
            print(f"{r['modality']:<8} {r['codec']:<16} {r['lm_positions_per_second']:>6g} positions/s  "
                  f"seq_len {r['seq_len']:>5}  step {r['step_s']:.3f}s  x{r['step_speedup_vs_slowest']}")
    return {"rows": rows}


def bench_attention(seq_len: int = 2048, micro_batch_size: int = 4, model: str = "tiny", repeats: int = 3,
                    paths: tuple[str, ...] | None = None, device: str | None = None,
                    workdir: str | Path | None = None, verbose: bool = True) -> dict[str, Any]:
    """Per attention path (:mod:`anygpt.attention`), on one packed batch of the synthetic corpus: the bytes
    that describe the attention pattern per micro-batch, the forward time (inputs built + the trainer's
    forward with the LM head at targets) and, where the path trains on this device, the step time
    (forward + backward + torch AdamW update).  The loss and the final hidden states are compared with
    mask4d's, so a fast path that computes something else shows up here.

    Same model, same batch, same optimizer for every path: the path is the only difference.  On a CPU
    only mask4d trains and flash_varlen cannot run; its bytes are still counted (they need no kernel).
    """
    import torch

    from anygpt.attention import PATHS, attention_inputs, mask_nbytes, set_attention, unavailable
    from anygpt.config import load_train_config
    from anygpt.data import TASK_NAMES, build_train_loader
    from anygpt.model import build_model
    from anygpt.text_tokenizer import prepare_tokenizer
    from anygpt.train.losses import TokenLoss, lm_loss

    paths = tuple(paths or PATHS)
    if paths[0] != "mask4d":
        paths = ("mask4d", *[p for p in paths if p != "mask4d"])  # the reference comes first
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tmp = tempfile.TemporaryDirectory(prefix="anygpt-bench-attention-") if workdir is None else None
    root = Path(workdir or tmp.name)
    try:
        # Speech/music pairs from 0.5 s up to a music clip of half a row (4 ids per frame): rows hold
        # examples of mixed lengths, from a few dozen tokens to half the row.
        corpus = synthetic_corpus(root / "data", pairs=96, conversations=0, eval_pairs=0,
                                  frames=(25, max(26, seq_len // 8)))
        tok, layout = prepare_tokenizer(corpus["tokenizer"])
        cfg = load_train_config(None, base={
            "model": {"name": model, "tokenizer": corpus["tokenizer"]},
            "data": {"sources": [{"name": "pairs", "shards": corpus["pairs"]}], "seq_len": seq_len},
            "optim": {"micro_batch_size": micro_batch_size}})
        with build_train_loader(cfg, tok, layout) as loader:
            batch = next(loader)
        lm = build_model(model, layout, tok, seed=0).to(dev)
        loss_fn = TokenLoss(layout, TASK_NAMES, dev)
        optimizer = torch.optim.AdamW(lm.parameters(), lr=1e-5)

        def sync() -> None:
            if dev.type == "cuda":
                torch.cuda.synchronize()

        def best(fn) -> float:
            fn()  # warm-up: compilation (flex), allocator
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                sync()
                times.append(time.perf_counter() - t0)
            return min(times)

        rows: list[dict[str, Any]] = []
        ref: dict[str, Any] = {}
        for path in paths:  # forwards first: the steps below change the weights
            row: dict[str, Any] = {"path": path, "mask_bytes": mask_nbytes(attention_inputs(batch, path, dev))}
            rows.append(row)
            reason = unavailable(path, dev.type, training=False)
            if reason:
                row["forward"] = row["step"] = f"skipped: {reason}"
                continue
            set_attention(lm, path)
            lm.eval()
            with torch.no_grad():
                inputs = attention_inputs(batch, path, dev)
                loss = float(lm_loss(lm, lm, inputs, batch, loss_fn)[0])
                hidden = lm.model(**inputs).last_hidden_state
                if path == "mask4d":
                    ref = {"loss": loss, "hidden": hidden}
                row["loss"] = loss
                row["loss_diff"] = abs(loss - ref["loss"])
                row["hidden_max_diff"] = float((hidden - ref["hidden"]).abs().max())
                row["forward_s"] = best(lambda: lm_loss(lm, lm, attention_inputs(batch, path, dev), batch, loss_fn))
        for row in rows:
            if "forward_s" not in row:
                continue
            path = row["path"]
            reason = unavailable(path, dev.type, training=True)
            if reason:
                row["step"] = f"skipped: {reason}"
                continue
            set_attention(lm, path)
            lm.train()

            def step() -> None:
                loss = lm_loss(lm, lm, attention_inputs(batch, path, dev), batch, loss_fn)[0]
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            row["step_s"] = best(step)
        base = rows[0]
        for row in rows:
            row["mask_bytes_ratio"] = row["mask_bytes"] / base["mask_bytes"]
            if "forward_s" in row and "forward_s" in base:
                row["forward_speedup"] = base["forward_s"] / row["forward_s"]
        seg = batch["segment_ids"]
        result = {"model": model, "params": sum(p.numel() for p in lm.parameters()), "device": dev.type,
                  "seq_len": seq_len, "micro_batch_size": micro_batch_size,
                  "tokens": int((seg > 0).sum()), "examples_per_row": float(seg.amax(dim=1).float().mean()),
                  "repeats": repeats, "paths": rows}
        if verbose:
            print(f"bench attention ({model}, {result['params'] / 1e6:.2f}M params, {micro_batch_size}x{seq_len} "
                  f"tokens, {result['examples_per_row']:.1f} examples per row, {dev.type})")
            print(f"  {'path':<13} {'mask bytes/step':>16} {'vs mask4d':>10} {'forward':>10} {'step':>10}  "
                  f"vs mask4d: loss, hidden states")
            for r in rows:
                fwd = f"{r['forward_s'] * 1e3:8.1f}ms" if "forward_s" in r else f"{'-':>10}"
                stp = f"{r['step_s'] * 1e3:8.1f}ms" if "step_s" in r else f"{'-':>10}"
                diff = f"{r['loss_diff']:.1e}, {r['hidden_max_diff']:.1e}" if "loss_diff" in r else "-"
                skipped = r.get("step", r.get("forward", ""))
                print(f"  {r['path']:<13} {r['mask_bytes']:>16,} {r['mask_bytes_ratio']:>10.2g} {fwd} {stp}  "
                      f"{diff}  {skipped}".rstrip())
        return json.loads(json.dumps(result, default=float))
    finally:
        if tmp is not None:
            tmp.cleanup()
