"""Train the SoundStorm acoustic decoder on the shards written by the preprocessing pipeline.

``anygpt soundstorm --config FILE [key=value ...] [--resume auto|DIR]`` (or ``python
launch/train_soundstorm.py`` with the same arguments; :mod:`anygpt.decoders.cli`) trains from a YAML of the shared config schema
(:mod:`anygpt.config`: typed sections, dotted overrides, one :class:`~anygpt.config.ConfigError` naming
the key, checked before any work); ``launch/configs/soundstorm.yaml`` is the shipped recipe.

Shards keep all of a speech codec's codebooks (``*.speech.npy``, ``[K, T]``) precisely so this decoder
can learn the acoustic ones from the LM's.  Every count comes from the codec's card, never from a
constant: the modality is the registered one whose plugin takes an acoustic prompt, its card comes
from ``model.codecs`` (the run's codecs directory) or the modality's default codec, and the decoder
conditions on the card's ``lm_codebooks`` leading codebooks and generates the rest, so the same
trainer serves SpeechTokenizer (8 x 1024 at 50 Hz) and any other RVQ codec.

The trainer is single-process on purpose: the decoder is small next to the LM (the release size is
~350 M parameters, one GPU), and keeping it free of DeepSpeed makes it runnable anywhere.  It shares
the LM trainer's helpers: the warmup+cosine schedule (:mod:`anygpt.train.schedule`), the device and
precision choice (:func:`anygpt.infer.generation.pick_device` / ``pick_dtype``: bf16 autocast on
CUDA), complete-only checkpoints with a ``latest`` pointer moved last (:mod:`anygpt.train.checkpoint`),
``metrics.jsonl`` (:mod:`anygpt.train.metrics`), the shard plan (:class:`anygpt.data.streams.ShardPlan`)
and the one shard reader / sample schema.

Run directory (``run.dir``)::

    config.yaml                  the resolved config (re-runnable with --resume auto)
    metrics.jsonl                {"step", "loss", "acc", "lr", "grad_norm", "frames_per_s", ...} per log
    checkpoints/step-N/          config.json + model.safetensors (a decoder directory itself),
                                 optimizer.pt (optimizer + schedule), rank00000.pt (data position, RNG),
                                 trainer_state.json, config.yaml, complete.json; ``latest`` names the newest
    config.json, model.safetensors   the final decoder: ``--soundstorm RUN_DIR`` loads it

Exact resume: the data order is a pure function of the seed (each epoch's shard order, then a seeded
permutation of blocks of ``data.shuffle_block`` samples, re-read from the block's start on restore),
crops and masks are drawn from generators seeded by ``(run.seed, step)``, and a checkpoint holds the
model, optimizer, schedule step, global RNG states and the data position ``(epoch, shard cursor,
sample offset, items taken)``; a resumed run repeats the uninterrupted one's per-step losses exactly.
"""
from __future__ import annotations

import io
import json
import logging
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping, Sequence

import numpy as np
import torch
import yaml
from safetensors.torch import load_file

from anygpt import modalities as registry
from anygpt.config import ConfigError, apply_overrides, from_dict, load_yaml, save_config, to_dict
from anygpt.data.mixing import hash_ints, name_id, seeded_rng
from anygpt.data.schema import SampleError, decode_sample
from anygpt.data.shards import ShardError, expand_shards
from anygpt.data.streams import DataError, Position, ShardPlan
from anygpt.decoders.soundstorm import (SIZES, WEIGHTS_NAME, SoundStorm, SoundStormConfig, SoundStormLoadError,
                                        acoustic_modality)
from anygpt.infer.generation import pick_device, pick_dtype
from anygpt.resources import resolve_config_path
from anygpt.train.checkpoint import (CheckpointError, CheckpointManager, checkpoints_root, latest_checkpoint,
                                     resolve_checkpoint, write_atomic)
from anygpt.train.faults import Faults
from anygpt.train.metrics import Progress, RunLogger
from anygpt.train.schedule import scheduler_factory

log = logging.getLogger(__name__)

STATE_VERSION = 1
OPTIMIZER_FILE = "optimizer.pt"
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
_LOG_FIRST = 20  # skipped samples logged per reason, then every 1000th


# ---------------------------------------------------------------------------- config schema
@dataclass
class SoundStormRunConfig:
    dir: str = "runs/soundstorm"
    """Run directory: config.yaml, metrics.jsonl, checkpoints/, and the final decoder (config.json +
    model.safetensors), so ``--soundstorm RUN_DIR`` loads it."""
    max_steps: int = 1000
    save_every: int = 500
    """Checkpoint every N steps (and always at the end)."""
    log_every: int = 10
    seed: int = 0
    keep_last: int = 2
    """Checkpoints to keep (older complete ones are deleted after a newer one is complete)."""
    device: str = "auto"
    """``auto`` (the first CUDA device when there is one, else CPU), ``cpu``, ``cuda`` or ``cuda:N``;
    CUDA runs under bf16 autocast."""
    tensorboard: bool = True
    progress: bool = True
    """Progress bar on stderr when it is a terminal (log lines otherwise)."""


@dataclass
class SoundStormModelConfig:
    size: Literal["tiny", "small", "base", "release"] = "release"
    """Architecture (``anygpt.decoders.soundstorm.SIZES``); ``release`` is AnyGPT's released decoder's."""
    modality: str | None = None
    """The modality to decode (default: the registered one whose plugin takes an acoustic prompt)."""
    codecs: str | None = None
    """The run's codecs directory (``<modality>/card.yaml`` inside gives the codec facts); default: the
    card of ``codec``."""
    codec: str | None = None
    """Card name when there is no codecs directory (default: the modality's default codec)."""
    init_from: str | None = None
    """A SoundStorm directory or AnyGPT's released ``.pt`` to start from (its architecture replaces
    ``size``; optimizer and data start fresh).  Continuing an interrupted run is ``--resume``."""
    dropout: float = 0.0


@dataclass
class SoundStormDataConfig:
    shards: str | list[str] = ""
    """Shard paths: a file, directory, glob, brace pattern, ``pipe:`` URL, ``::``-joined or a list.
    Every media member of the modality counts (pairs and conversation turns)."""
    batch_size: int = 8
    max_frames: int = 500
    """Crop length in codec frames (SpeechTokenizer: 50 per second, so 500 = 10 s)."""
    shuffle_block: int = 256
    """Samples shuffled together (a seeded permutation per block, re-read on resume)."""


@dataclass
class SoundStormOptimConfig:
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 100
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    grad_clip: float = 1.0


@dataclass
class SoundStormTrainConfig:
    run: SoundStormRunConfig = field(default_factory=SoundStormRunConfig)
    model: SoundStormModelConfig = field(default_factory=SoundStormModelConfig)
    data: SoundStormDataConfig = field(default_factory=SoundStormDataConfig)
    optim: SoundStormOptimConfig = field(default_factory=SoundStormOptimConfig)

    def validate(self) -> "SoundStormTrainConfig":
        """Cross-field checks that need no file; every message names a key."""
        r, m, d, o = self.run, self.model, self.data, self.optim
        for key, value in [("run.max_steps", r.max_steps), ("run.save_every", r.save_every),
                           ("run.log_every", r.log_every), ("run.keep_last", r.keep_last),
                           ("data.batch_size", d.batch_size), ("data.max_frames", d.max_frames),
                           ("data.shuffle_block", d.shuffle_block)]:
            if value <= 0:
                raise ConfigError(f"{key}: must be > 0, got {value}")
        if not _DEVICE.match(r.device):
            raise ConfigError(f"run.device: {r.device!r} is not auto, cpu, cuda or cuda:N")
        if not d.shards:
            raise ConfigError("data.shards: required (the speech shards to train on)")
        if not 0.0 <= m.dropout < 1.0:
            raise ConfigError(f"model.dropout: must be in [0, 1), got {m.dropout}")
        if o.lr <= 0 or o.min_lr < 0 or o.min_lr > o.lr:
            raise ConfigError(f"optim.min_lr: need 0 <= min_lr <= lr (lr={o.lr}, min_lr={o.min_lr})")
        if o.warmup_steps < 0 or o.warmup_steps > r.max_steps:
            raise ConfigError(f"optim.warmup_steps: must be within [0, run.max_steps={r.max_steps}], got {o.warmup_steps}")
        if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
            raise ConfigError(f"optim.betas: need two values in [0, 1), got {o.betas}")
        if o.weight_decay < 0:
            raise ConfigError(f"optim.weight_decay: must be >= 0, got {o.weight_decay}")
        if o.grad_clip < 0:
            raise ConfigError(f"optim.grad_clip: must be >= 0, got {o.grad_clip}")
        return self


def load_soundstorm_config(path: str | Path | None, overrides: Sequence[str] = (),
                           base: Mapping[str, Any] | None = None) -> SoundStormTrainConfig:
    """YAML file (a path, or a shipped config's name such as ``soundstorm``) or ``base`` mapping, plus
    dotted ``key=value`` overrides -> validated :class:`SoundStormTrainConfig`."""
    data = load_yaml(resolve_config_path(path)) if path is not None else json.loads(json.dumps(dict(base or {})))
    data = apply_overrides(data, list(overrides))
    return from_dict(SoundStormTrainConfig, data).validate()


# ---------------------------------------------------------------------------- preflight
@dataclass
class Plan:
    """What :func:`preflight` resolved from the config and the files it names."""

    modality: str
    card: dict[str, Any]
    shards: list[str]
    device: torch.device
    resume_from: Path | None


def codec_card_for(cfg: SoundStormTrainConfig) -> tuple[str, dict[str, Any]]:
    """``(modality, card)`` of the run: the acoustic modality and its codec's card (from ``model.codecs``
    when set, else the card named by ``model.codec`` or the modality's default)."""
    m = cfg.model
    try:
        modality = acoustic_modality(m.modality)
    except registry.CodecError as e:
        raise ConfigError(f"model.modality: {e}") from None
    if m.codecs is not None:
        if not Path(m.codecs).is_dir():
            raise ConfigError(f"model.codecs: {m.codecs}: no such directory")
        cards = registry.directory_cards(m.codecs)
        if modality not in cards:
            raise ConfigError(f"model.codecs: {m.codecs} has no '{modality}/' codec directory")
        card = cards[modality]
        if m.codec is not None and card["name"] != m.codec:
            raise ConfigError(f"model.codec: {m.codecs}/{modality} holds codec {card['name']!r}, not {m.codec!r}")
    else:
        try:
            card = registry.codec_card(modality, m.codec)
        except registry.CodecError as e:
            raise ConfigError(f"model.codec: {e}") from None
    if int(card["num_codebooks"]) <= int(card["lm_codebooks"]):
        raise ConfigError(f"model.codecs: the {card['name']} codec has {card['num_codebooks']} codebook(s), all "
                          f"seen by the LM (lm_codebooks={card['lm_codebooks']}): nothing for an acoustic decoder")
    return modality, card


def resolve_resume(run_dir: str | Path, resume: str | None) -> Path | None:
    """``None`` (fresh; refuses a run dir holding checkpoints), ``"auto"`` (newest complete checkpoint
    of ``run_dir`` if any) or a run/checkpoint directory."""
    root = checkpoints_root(run_dir)
    if resume is None:
        if latest_checkpoint(root) is not None:
            raise ConfigError(f"run.dir: {run_dir} already holds checkpoints; pass --resume auto to continue "
                              f"it or choose another run.dir")
        return None
    if resume == "auto":
        return latest_checkpoint(root)
    try:
        return resolve_checkpoint(resume)
    except CheckpointError as e:
        raise ConfigError(f"--resume: {e}") from None


def preflight(cfg: SoundStormTrainConfig, resume: str | None = None) -> Plan:
    """Every check that reads files (codec card, shards, device, resume point) before any model exists."""
    modality, card = codec_card_for(cfg)
    try:
        shards = expand_shards(cfg.data.shards)
    except ShardError as e:
        raise ConfigError(f"data.shards: {e}") from None
    if cfg.run.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"run.device: {cfg.run.device} requested but CUDA is not available")
    init = cfg.model.init_from
    if init is not None and not Path(init).exists():
        raise ConfigError(f"model.init_from: {init}: no such directory or file")
    return Plan(modality, card, shards, pick_device(cfg.run.device), resolve_resume(cfg.run.dir, resume))


# ---------------------------------------------------------------------------- data
def codes_of_sample(raw: Mapping[str, Any], modality: str, num_codebooks: int,
                    codebook_size: int) -> list[np.ndarray]:
    """Every ``[num_codebooks, T]`` code array of ``modality`` in a raw shard sample.

    Pairs give their one member, conversations every turn's member of that modality (an RVQ's leading
    ``num_codebooks`` when a shard keeps more).  Raises :class:`SampleError` when the sample is unusable
    (``missing_json``, ``bad_npy`` ...), when one of its media items has fewer codebooks than the codec
    (``too_few_codebooks``: e.g. kept for the LM only) or codes outside the codebook (``bad_codes``:
    made with another codec).
    """
    sample = decode_sample(dict(raw))
    known = registry.names()
    if sample.kind == "pair":
        try:
            found, member = sample.pair_member(known)
        except SampleError as e:
            if e.reason == "missing_media":
                return []  # a pair of another modality's file kind: nothing for this decoder
            raise
        members = [member] if found == modality else []
    else:
        members = [value for _, parts in sample.turns(known) for kind, value in parts if kind == modality]
    out = []
    for member in members:
        codes = sample.codes(member)
        if codes.shape[0] < num_codebooks:
            raise SampleError("too_few_codebooks", f"{member}: {codes.shape[0]} codebook(s), the codec has "
                                                   f"{num_codebooks}")
        codes = codes[:num_codebooks]
        if int(codes.min()) < 0 or int(codes.max()) >= codebook_size:
            raise SampleError("bad_codes", f"{member}: codes in [{int(codes.min())}, {int(codes.max())}], the "
                                           f"codebooks hold {codebook_size}")
        out.append(codes)
    return out


class CodeStream:
    """Endless, exactly restorable stream of one modality's full codes ``[K, T]`` from shards.

    The position after each item is ``(epoch, cursor, offset, taken)`` (:class:`Position`): each epoch
    reads the shards in its own seeded order (:class:`ShardPlan`); the items of each block of
    ``block`` samples come out in a seeded permutation, and a restore re-reads the block from its start
    and skips ``taken`` items, so no buffer has to be saved.  Damaged shards are logged once by name
    with the samples they lost and counted; unusable samples are counted by reason; the run goes on.
    """

    def __init__(self, shards: Sequence[str], modality: str, num_codebooks: int, codebook_size: int,
                 seed: int, block: int = 256):
        self.modality = modality
        self.num_codebooks = int(num_codebooks)
        self.codebook_size = int(codebook_size)
        self.seed = int(seed)
        self.block = max(1, int(block))
        self.plan = ShardPlan(list(shards), f"soundstorm:{modality}", self.seed)
        self.position = Position()
        self.skipped: Counter = Counter()
        self.bad_shards: dict[str, str] = {}
        self.lost_samples = 0
        self._gen: Iterator[tuple[np.ndarray, Position]] | None = None

    def _on_bad_shard(self, url: str, error: ShardError) -> None:
        self.lost_samples += error.lost or 0
        if url not in self.bad_shards:
            log.error("soundstorm data: damaged shard, going on: %s", error)
        self.bad_shards[url] = str(error)

    def _codes(self, raw: Mapping[str, Any]) -> list[np.ndarray]:
        try:
            return codes_of_sample(raw, self.modality, self.num_codebooks, self.codebook_size)
        except SampleError as e:
            self.skipped[e.reason] += 1
            n = self.skipped[e.reason]
            if n <= _LOG_FIRST or n % 1000 == 0:
                log.warning("soundstorm data: skipped sample %s of %s (%s) [%d skipped for this reason]",
                            raw.get("__key__"), raw.get("__url__"), e, n)
            return []

    def _items(self, start: Position) -> Iterator[tuple[np.ndarray, Position]]:
        epoch, cursor, offset, taken = start.epoch, start.cursor, start.offset, start.taken
        while True:
            from_epoch_start = cursor == offset == taken == 0
            samples = self.plan.read(epoch, cursor, offset, self._on_bad_shard)
            block_start = (epoch, cursor, offset)
            found = 0
            while True:
                items: list[np.ndarray] = []
                n_samples, exhausted, end = 0, True, (epoch + 1, 0, 0)
                for raw, after in samples:
                    items += self._codes(raw)
                    n_samples += 1
                    if n_samples == self.block:
                        exhausted, end = False, after
                        break
                if n_samples == 0:
                    break
                found += len(items)
                perm = seeded_rng(self.seed, name_id(self.plan.source), 0x424C, *block_start).permutation(len(items))
                for i in range(taken, len(items)):
                    after_item = Position(*block_start, i + 1) if i + 1 < len(items) else Position(*end, 0)
                    yield items[perm[i]], after_item
                taken = 0
                if exhausted:
                    break
                block_start = end
            if found == 0 and from_epoch_start:
                reasons = ", ".join(f"{k} {v}" for k, v in self.skipped.most_common()) or "none"
                raise DataError(f"data.shards: no {self.modality} codes with {self.num_codebooks} codebooks in a "
                                f"whole epoch over {len(self.plan.shards)} shard(s), e.g. {self.plan.shards[0]} "
                                f"(skipped samples: {reasons}; damaged shards: {len(self.bad_shards)})")
            epoch, cursor, offset, taken = epoch + 1, 0, 0, 0

    def __iter__(self) -> "CodeStream":
        return self

    def __next__(self) -> np.ndarray:
        if self._gen is None:
            self._gen = self._items(self.position)
        codes, self.position = next(self._gen)
        return codes

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position after the last item handed out, and the counters."""
        return {"version": STATE_VERSION, "seed": self.seed, "modality": self.modality, "block": self.block,
                "num_shards": len(self.plan.shards), "position": self.position.to_dict(),
                "skipped": dict(self.skipped), "lost_samples": self.lost_samples}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a position saved by :meth:`state_dict` (same seed, modality, block and shard count)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"soundstorm data state version {state.get('version')!r} is not {STATE_VERSION}")
        for key, mine in (("seed", self.seed), ("modality", self.modality), ("block", self.block),
                          ("num_shards", len(self.plan.shards))):
            if state.get(key) != mine:
                raise ValueError(f"data state was saved with {key}={state.get(key)!r}, this run has {mine!r}: "
                                 "the data order would differ (exact resume needs the same value)")
        self.position = Position.from_dict(state["position"])
        self.skipped = Counter(state.get("skipped", {}))
        self.lost_samples = int(state.get("lost_samples", 0))
        self._gen = None


def make_batch(items: Sequence[np.ndarray], max_frames: int,
               rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ``max_frames`` crops, zero-padded to the longest: -> (codes [B, K, T], lengths [B])."""
    crops = []
    for codes in items:
        t = codes.shape[1]
        start = int(rng.integers(t - max_frames + 1)) if t > max_frames else 0
        crops.append(codes[:, start:start + max_frames])
    longest = max(c.shape[1] for c in crops)
    batch = np.zeros((len(crops), crops[0].shape[0], longest), dtype=np.int64)
    for i, c in enumerate(crops):
        batch[i, :, : c.shape[1]] = c
    lengths = torch.tensor([c.shape[1] for c in crops], dtype=torch.long)
    return torch.from_numpy(batch), lengths


# ---------------------------------------------------------------------------- checkpoint state
class _TrainState:
    """Model + optimizer + schedule behind the two methods :class:`CheckpointManager` calls on an
    engine, so this trainer shares its complete-only saves, pointer, pruning and RNG handling."""

    def __init__(self, model: SoundStorm, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler

    def save_checkpoint(self, root: str, tag: str, save_latest: bool = False) -> None:
        ckpt = Path(root) / tag
        self.model.save_pretrained(ckpt)  # a checkpoint is also a decoder directory
        buf = io.BytesIO()
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}, buf)
        write_atomic(ckpt / OPTIMIZER_FILE, buf.getvalue())

    def load_checkpoint(self, root: str, tag: str, load_optimizer_states: bool = True,
                        load_lr_scheduler_states: bool = True) -> tuple[str, dict]:
        ckpt = Path(root) / tag
        state = load_file(str(ckpt / WEIGHTS_NAME))
        self.model.check_state_dict(state, str(ckpt / WEIGHTS_NAME))
        self.model.load_state_dict(state, strict=True)
        opt = torch.load(ckpt / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(opt["optimizer"])
        self.scheduler.load_state_dict(opt["scheduler"])
        return str(ckpt), {}


def build_model(cfg: SoundStormTrainConfig, plan: Plan) -> SoundStorm:
    """A fresh decoder for the run's card at ``model.size``, or the one ``model.init_from`` names."""
    init = cfg.model.init_from
    if init is None:
        return SoundStorm(SoundStormConfig.from_card(plan.card, cfg.model.size, dropout=cfg.model.dropout))
    try:
        if Path(init).is_dir():
            return SoundStorm.from_pretrained(init, dtype=torch.float32, card=plan.card).train()
        return SoundStorm.load_anygpt_release(init, card=plan.card).train()
    except SoundStormLoadError as e:
        raise ConfigError(f"model.init_from: {e}") from None


def _optimizer(model: SoundStorm, o: SoundStormOptimConfig) -> torch.optim.Optimizer:
    # No weight decay on norms, biases and embeddings (the usual transformer recipe).
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and not name.endswith("_emb.weight") else no_decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=o.lr, betas=(o.betas[0], o.betas[1]), eps=1e-8)


# ---------------------------------------------------------------------------- training
def train(cfg: SoundStormTrainConfig, resume: str | None = None) -> dict[str, Any]:
    """Train (or resume) a SoundStorm decoder as ``cfg`` says; the final decoder lands in ``run.dir``.

    Args:
        cfg: a validated :class:`SoundStormTrainConfig` (:func:`load_soundstorm_config`).
        resume: ``None`` (fresh; refuses a run dir holding checkpoints), ``"auto"`` (newest complete
            checkpoint of ``run.dir``, fresh when there is none) or a run/checkpoint directory.
    Returns a summary: ``out_dir``, ``steps``, ``first_loss`` / ``final_loss`` (the first logged step of
    this process / mean of its last 10 steps; None when nothing was left to do), ``skipped_samples``
    (by reason), ``damaged_shards``, ``lost_samples``, ``seconds``.
    """
    plan = preflight(cfg, resume)
    r, d, o = cfg.run, cfg.data, cfg.optim
    run_dir = Path(r.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    config_text = yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)
    faults = Faults.from_env(0)
    dev = plan.device
    # bf16 keeps fp32's exponent range, so no loss scaling is needed; without bf16 support stay fp32.
    amp = dev.type == "cuda" and pick_dtype(dev) == torch.bfloat16
    if plan.resume_from is None:
        torch.manual_seed(r.seed)  # the fresh model's init
    model = build_model(cfg, plan).to(dev).train()
    optimizer = _optimizer(model, o)
    scheduler = scheduler_factory(o.lr, o.min_lr, o.warmup_steps, r.max_steps)(optimizer)
    stream = CodeStream(plan.shards, plan.modality, model.config.num_quantizers, model.config.codebook_size,
                        r.seed, d.shuffle_block)
    state = _TrainState(model, optimizer, scheduler)
    ckpts = CheckpointManager(run_dir, r.keep_last, rank=0, world_size=1)
    step = 0
    if plan.resume_from is not None:
        meta, loader_state = ckpts.load(state, plan.resume_from)
        stream.load_state_dict(loader_state)
        step = int(meta["step"])
    logger = RunLogger(run_dir, True, start_step=step, resumed=plan.resume_from is not None,
                       tensorboard=r.tensorboard, config=to_dict(cfg))
    progress = Progress(True, r.max_steps, step, show_bar=r.progress and sys.stderr.isatty())
    c = model.config
    seconds = d.max_frames / c.frame_rate if c.frame_rate else None
    progress.write(
        f"anygpt soundstorm: {plan.modality} codec {plan.card['name']} ({c.num_quantizers} codebooks of "
        f"{c.codebook_size}, {c.semantic_codebooks} from the LM); {cfg.model.size if cfg.model.init_from is None else cfg.model.init_from}: "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params on {dev.type}{' (bf16 autocast)' if amp else ''}; "
        f"batch {d.batch_size} x {d.max_frames} frames" + (f" ({seconds:.1f} s)" if seconds else "")
        + f"; {len(plan.shards)} shard(s); " + (f"resumed from {plan.resume_from} at step {step}"
                                                 if plan.resume_from else "fresh start") + f"; run dir {run_dir}")

    masks = torch.Generator(device=dev)
    losses: list[float] = []
    started = time.perf_counter()
    frames = 0
    while step < r.max_steps:
        # Crops and masks are functions of (seed, step): nothing but the step to restore for them.
        codes, lengths = make_batch([next(stream) for _ in range(d.batch_size)], d.max_frames,
                                    seeded_rng(r.seed, 0x43524F50, step))
        masks.manual_seed(hash_ints(r.seed, 0x4D41534B, step) >> 1)
        codes, lengths = codes.to(dev, non_blocking=True), lengths.to(dev)
        lr = optimizer.param_groups[0]["lr"]  # the schedule's value for this update
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=amp):
            loss, stats = model.loss(codes, lengths, generator=masks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip) if o.grad_clip > 0 else None
        optimizer.step()
        scheduler.step()
        step += 1
        losses.append(stats["loss"])
        frames += int(lengths.sum())
        elapsed = time.perf_counter() - started
        progress.update(1, loss=f"{stats['loss']:.3f}", acc=f"{stats['acc']:.3f}")
        if step % r.log_every == 0 or len(losses) == 1 or step == r.max_steps:
            row = {"step": step, "loss": stats["loss"], "acc": stats["acc"], "lr": lr,
                   "grad_norm": float(grad_norm) if grad_norm is not None else None,
                   "masked": stats["masked"], "frames_per_s": frames / max(elapsed, 1e-9),
                   "skipped_samples": sum(stream.skipped.values()), "lost_samples": stream.lost_samples}
            logger.log_train(row)
            progress.write(f"step {step}/{r.max_steps} loss {stats['loss']:.4f} acc {stats['acc']:.3f} lr {lr:.2e}")
        if step % r.save_every == 0 or step == r.max_steps:
            ckpts.save(state, step, stream.state_dict(), {"frames": frames}, {"config.yaml": config_text},
                       fault=faults)
        faults.maybe("kill_after_step", step)
    progress.close()
    logger.close()
    model.save_pretrained(run_dir)
    tail = losses[-10:]
    return {
        "out_dir": str(run_dir),
        "steps": step,
        "first_loss": losses[0] if losses else None,
        "final_loss": float(sum(tail) / len(tail)) if tail else None,
        "skipped_samples": dict(stream.skipped),
        "damaged_shards": sorted(stream.bad_shards),
        "lost_samples": stream.lost_samples,
        "seconds": time.perf_counter() - started,
    }


def _size_of(config: SoundStormConfig) -> str:
    for name, sizes in SIZES.items():
        if all(getattr(config, k) == v for k, v in sizes.items()):
            return name
    raise ValueError(f"SoundStorm sizes {config} match none of {', '.join(SIZES)}; pass size=")


def train_soundstorm(
    shards: str | Path | Sequence[str | Path],
    out_dir: str | Path,
    steps: int = 1000,
    batch_size: int = 8,
    lr: float = 3e-4,
    max_frames: int = 500,
    seed: int = 0,
    device: str = "auto",
    config: SoundStormConfig | None = None,
    init_from: str | Path | None = None,
    warmup_steps: int | None = None,
    weight_decay: float = 0.01,
    grad_clip: float = 1.0,
    log_every: int = 10,
    save_every: int = 0,
    progress: bool = True,
    *,
    size: str | None = None,
    codecs: str | Path | None = None,
    resume: str | None = None,
) -> dict[str, Any]:
    """Keyword form of :func:`train` for Python callers (the demo): builds the config, then trains.

    ``size`` (``tiny`` ... ``release``; or ``config``, whose sizes must be one of them) and ``codecs``
    (the run's codecs directory; default: the modality's default card) choose the model; ``save_every``
    0 saves only at the end; ``warmup_steps`` defaults to 5% of ``steps`` (at most 1000); the cosine
    ends at ``lr / 10``.  ``out_dir`` is the run directory and receives the final decoder.
    """
    items = [str(shards)] if isinstance(shards, (str, Path)) else [str(s) for s in shards]
    base = {
        "run": {"dir": str(out_dir), "max_steps": steps, "save_every": save_every or steps, "log_every": log_every,
                "seed": seed, "device": str(device), "tensorboard": False, "progress": progress},
        "model": {"size": size or (_size_of(config) if config is not None else "release"),
                  "codecs": None if codecs is None else str(codecs),
                  "init_from": None if init_from is None else str(init_from),
                  "dropout": config.dropout if config is not None else 0.0},
        "data": {"shards": items, "batch_size": batch_size, "max_frames": max_frames},
        "optim": {"lr": lr, "min_lr": lr / 10, "weight_decay": weight_decay, "grad_clip": grad_clip,
                  "warmup_steps": min(1000, max(1, steps // 20)) if warmup_steps is None else warmup_steps},
    }
    return train(load_soundstorm_config(None, base=base), resume=resume)


__all__ = ["SoundStormTrainConfig", "load_soundstorm_config", "preflight", "codec_card_for", "codes_of_sample",
           "CodeStream", "make_batch", "train", "train_soundstorm"]
