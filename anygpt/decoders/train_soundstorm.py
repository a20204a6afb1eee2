"""Train the SoundStorm acoustic decoder on the speech shards written by the preprocessing pipeline.

Speech shards keep all 8 SpeechTokenizer layers (``*.speech.npy``, int64 ``[8, T]``) precisely so this
decoder can learn layers 2-8 from layer 1.  The trainer is single-process on purpose: the decoder is
small next to the LM (the release size is ~350 M parameters, one GPU), and keeping it free of DeepSpeed
makes it runnable anywhere.  It streams every shard in a seeded random order, epoch after epoch, crops
utterances to ``max_frames`` at a random offset, and optimises ``SoundStorm.loss`` with AdamW, a linear
warmup and a cosine decay; on CUDA it runs under bf16 autocast.
"""
from __future__ import annotations

import glob
import io
import json
import math
import random
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch

from anygpt.decoders.soundstorm import SoundStorm, SoundStormConfig

SPEECH_KEY_SUFFIX = "speech.npy"


def expand_shards(patterns: Sequence[str | Path]) -> list[str]:
    """Expand brace ranges (``speech-{000000..000009}.tar``) and globs; keep plain paths as they are."""
    from braceexpand import braceexpand

    out: list[str] = []
    for pattern in patterns:
        for item in braceexpand(str(pattern)):
            matches = sorted(glob.glob(item)) if any(ch in item for ch in "*?[") else [item]
            out.extend(matches)
    missing = [p for p in out if "://" not in p and not Path(p).is_file()]
    if not out:
        raise FileNotFoundError(f"no shards match {', '.join(map(str, patterns))}")
    if missing:
        raise FileNotFoundError(f"shard not found: {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return out


def speech_codes_from_sample(sample: Mapping[str, Any], num_quantizers: int) -> list[np.ndarray]:
    """Every usable ``[num_quantizers, T]`` speech array of a WebDataset sample (possibly none).

    Any entry whose name ends in ``speech.npy`` counts: ``speech.npy`` of pairs, ``m{i}.speech.npy`` of
    conversation turns.  Samples without one (text/image/music-only rows in mixed shards) and speech kept
    with fewer layers are skipped rather than failing the run.
    """
    found: list[np.ndarray] = []
    keys = sorted(k for k in sample if isinstance(k, str) and k.endswith(SPEECH_KEY_SUFFIX))
    for key in keys:
        value = sample[key]
        try:
            arr = np.load(io.BytesIO(value), allow_pickle=False) if isinstance(value, (bytes, bytearray)) else np.asarray(value)
        except (ValueError, OSError, EOFError):  # unreadable entry: skip it like any unusable sample
            continue
        if arr.ndim == 3 and arr.shape[0] == 1:
            arr = arr[0]  # [1, 8, T] as some codecs return it
        if arr.ndim != 2 or arr.shape[0] != num_quantizers or arr.shape[1] < 1:
            continue  # e.g. layer-1-only speech: nothing for the acoustic decoder to learn from
        if not np.issubdtype(arr.dtype, np.integer):
            continue
        found.append(arr.astype(np.int64, copy=False))
    return found


def iter_speech_codes(shards: Sequence[str], num_quantizers: int, rng: random.Random,
                      shuffle_buffer: int = 256) -> Iterator[np.ndarray]:
    """Endless stream of speech code arrays: shards in a new seeded order every epoch, buffer-shuffled."""
    import webdataset as wds

    buffer: list[np.ndarray] = []
    while True:
        order = list(shards)
        rng.shuffle(order)
        # Single process reads every shard: no node/worker splitting (the default refuses multi-rank).
        dataset = wds.WebDataset(order, shardshuffle=False, nodesplitter=None, workersplitter=None,
                                 empty_check=False)
        found = 0
        for sample in dataset:
            for codes in speech_codes_from_sample(sample, num_quantizers):
                found += 1
                buffer.append(codes)
                if len(buffer) >= shuffle_buffer:
                    yield buffer.pop(rng.randrange(len(buffer)))
        if found == 0:
            raise ValueError(f"no sample with a '*{SPEECH_KEY_SUFFIX}' entry of {num_quantizers} code layers "
                             f"in {len(shards)} shard(s), e.g. {shards[0]}")
        # Keep part of the buffer to mix across the epoch boundary, but never so much that a small
        # corpus (fewer samples than the buffer) stalls.
        keep = min(shuffle_buffer // 2, found // 2)
        rng.shuffle(buffer)
        while len(buffer) > keep:
            yield buffer.pop()


def make_batch(items: Sequence[np.ndarray], max_frames: int, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ``max_frames`` crops, zero-padded to the longest: -> (codes [B, Q, T], lengths [B])."""
    crops = []
    for codes in items:
        t = codes.shape[1]
        start = rng.randrange(t - max_frames + 1) if t > max_frames else 0
        crops.append(codes[:, start:start + max_frames])
    longest = max(c.shape[1] for c in crops)
    batch = np.zeros((len(crops), crops[0].shape[0], longest), dtype=np.int64)
    for i, c in enumerate(crops):
        batch[i, :, : c.shape[1]] = c
    lengths = torch.tensor([c.shape[1] for c in crops], dtype=torch.long)
    return torch.from_numpy(batch), lengths


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return dev


def _lr_factor(step: int, warmup: int, total: int, floor: float = 0.1) -> float:
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def train_soundstorm(
    shards: Sequence[str | Path],
    out_dir: str | Path,
    steps: int = 1000,
    batch_size: int = 8,
    lr: float = 3e-4,
    max_frames: int = 500,
    seed: int = 0,
    device: str | torch.device | None = "auto",
    config: SoundStormConfig | None = None,
    init_from: str | Path | None = None,
    warmup_steps: int | None = None,
    weight_decay: float = 0.01,
    grad_clip: float = 1.0,
    log_every: int = 10,
    save_every: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Train (or continue training) a SoundStorm decoder and save it to ``out_dir`` with ``save_pretrained``.

    Args:
        shards: WebDataset tar paths, brace patterns or globs.
        out_dir: receives ``config.json`` + ``model.safetensors`` and ``metrics.jsonl`` (one line per log).
        steps: optimiser steps.
        max_frames: crop length in 50 Hz frames (500 = 10 s).
        config: model sizes for a fresh model (default: the AnyGPT release sizes); ignored with ``init_from``.
        init_from: a ``save_pretrained`` directory to continue from.
        warmup_steps: linear warmup (default: 5% of ``steps``, at most 1000), then cosine decay to 10%.
        save_every: also save every N steps (0: only at the end).
    Returns a summary: ``out_dir``, ``steps``, ``first_loss``, ``final_loss`` (mean of the last 10 steps),
    ``seconds``.
    """
    from tqdm.auto import tqdm

    if steps < 1 or batch_size < 1 or max_frames < 1:
        raise ValueError(f"steps, batch_size and max_frames must be >= 1 (got {steps}, {batch_size}, {max_frames})")
    shard_list = expand_shards(list(shards))
    dev = resolve_device(device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    rng = random.Random(seed)

    if init_from is not None:
        model = SoundStorm.from_pretrained(init_from, device=dev, dtype=torch.float32)
    else:
        model = SoundStorm(config or SoundStormConfig.anygpt_release()).to(dev)
    model.train()
    cfg = model.config

    # No weight decay on norms, biases and embeddings (the usual transformer recipe).
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and not n.endswith("_emb.weight")]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and not n.endswith("_emb.weight"))]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.98), eps=1e-8,
    )
    warmup = min(1000, max(1, steps // 20)) if warmup_steps is None else warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, warmup, steps))
    use_bf16 = dev.type == "cuda" and torch.cuda.is_bf16_supported()

    stream = iter_speech_codes(shard_list, cfg.num_quantizers, rng)
    metrics_path = out / "metrics.jsonl"
    losses: list[float] = []
    started = time.perf_counter()
    frames_seen = 0
    bar = tqdm(total=steps, desc="soundstorm", unit="step", disable=not progress, dynamic_ncols=True)
    with metrics_path.open("a") as metrics:
        for step in range(steps):
            codes, lengths = make_batch([next(stream) for _ in range(batch_size)], max_frames, rng)
            codes, lengths = codes.to(dev, non_blocking=True), lengths.to(dev)
            with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=use_bf16):
                loss, stats = model.loss(codes, lengths)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip) if grad_clip > 0 else None
            optimizer.step()
            scheduler.step()

            losses.append(stats["loss"])
            frames_seen += int(lengths.sum())
            elapsed = time.perf_counter() - started
            bar.update(1)
            bar.set_postfix(loss=f"{stats['loss']:.3f}", acc=f"{stats['acc']:.3f}",
                            fps=f"{frames_seen / max(elapsed, 1e-9):.0f}")
            if (step + 1) % max(1, log_every) == 0 or step == 0 or step + 1 == steps:
                record = {"step": step + 1, **stats, "lr": scheduler.get_last_lr()[0],
                          "grad_norm": float(grad_norm) if grad_norm is not None else None,
                          "frames_per_s": frames_seen / max(elapsed, 1e-9)}
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                bar.write(f"step {step + 1}/{steps} loss {stats['loss']:.4f} acc {stats['acc']:.3f} "
                          f"lr {record['lr']:.2e}")
            if save_every and (step + 1) % save_every == 0 and step + 1 != steps:
                model.save_pretrained(out)
    bar.close()
    model.save_pretrained(out)
    tail = losses[-10:]
    return {
        "out_dir": str(out),
        "steps": steps,
        "first_loss": losses[0],
        "final_loss": float(sum(tail) / len(tail)),
        "seconds": time.perf_counter() - started,
    }


__all__ = ["expand_shards", "iter_speech_codes", "make_batch", "speech_codes_from_sample", "train_soundstorm"]
