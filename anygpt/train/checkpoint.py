"""Checkpoints that count only once complete, a pointer updated last, exact resume, keep-last-K.

Layout of ``RUN_DIR/checkpoints/``::

    latest                      text file naming the newest complete checkpoint ("step-00000040");
                                replaced atomically (write + fsync + rename) as the very last act of a
                                save, so it never names a partial one.  DeepSpeed's own tools
                                (``zero_to_fp32.py``) read the same file name.
    step-00000040/              one checkpoint (the DeepSpeed "tag")
        zero_pp_rank_*_mp_rank_00_model_states.pt, *_optim_states.pt   DeepSpeed: model, optimizer,
                                schedule, step counters (one file pair per rank under ZeRO)
        rank00000.pt ...        per rank: data-loader state and RNG states (python, numpy, torch, CUDA)
        trainer_state.json      step, tokens seen, non-finite streak, world size, precision, LoRA
        config.yaml             the resolved config of the run
        vocab_layout.json, tokenizer/   the vocabulary layout and tokenizer the weights belong to
        hf_config/config.json   the model's Hugging Face config (export builds the skeleton from it)
        complete.json           written after every rank finished its files

A save killed at any point before the pointer moves leaves the previous checkpoint named by
``latest`` and intact; the next save of the same step (or a resume) removes the partial directory.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINTS = "checkpoints"
POINTER = "latest"
COMPLETE = "complete.json"
TRAINER_STATE = "trainer_state.json"
_TAG = re.compile(r"^step-(\d{8})$")


class CheckpointError(ValueError):
    """No usable checkpoint where one was asked for."""


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


def step_of(path: Path) -> int | None:
    m = _TAG.match(Path(path).name)
    return int(m.group(1)) if m else None


def is_complete(ckpt: Path) -> bool:
    return (Path(ckpt) / COMPLETE).is_file() and (Path(ckpt) / TRAINER_STATE).is_file()


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write ``path`` so that readers see either the old or the whole new content."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def checkpoints_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def list_checkpoints(root: Path) -> list[Path]:
    """All ``step-*`` directories (complete or not), oldest first."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and step_of(p) is not None), key=step_of)


def latest_checkpoint(root: Path) -> Path | None:
    """The checkpoint the pointer names, if complete; else the newest complete one; else None.

    The pointer is authoritative; the scan only covers a pointer lost or damaged outside a save
    (a save never moves it to anything incomplete).
    """
    pointer = root / POINTER
    if pointer.is_file():
        name = pointer.read_text(encoding="utf-8").strip()
        if _TAG.match(name) and is_complete(root / name):
            return root / name
    complete = [p for p in list_checkpoints(root) if is_complete(p)]
    return complete[-1] if complete else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory, a ``checkpoints/`` directory or one checkpoint -> that complete checkpoint."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such directory")
    if step_of(path) is not None or (path / COMPLETE).exists():
        if not is_complete(path):
            raise CheckpointError(f"{path}: incomplete checkpoint (its save did not finish)")
        return path
    for root in (path / CHECKPOINTS, path):
        if root.is_dir():
            found = latest_checkpoint(root)
            if found is not None:
                return found
    raise CheckpointError(f"{path}: no complete checkpoint found")


# ---------------------------------------------------------------------------- run files
def run_files(cfg: Any, layout: Any, tokenizer: Any, model: Any) -> dict[str, Any]:
    """What every checkpoint of a run holds beside the weights (``anygpt export`` reads them): the
    resolved config, the vocabulary layout, the tokenizer and the Hugging Face model config (of the
    base model under a PEFT wrapper)."""
    from anygpt.config import save_config

    hf_config = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
    return {"config.yaml": lambda t: save_config(cfg, t), "vocab_layout.json": lambda t: layout.save(t),
            "tokenizer": lambda t: tokenizer.save_pretrained(str(t)),
            "hf_config": lambda t: hf_config.save_pretrained(str(t))}


# ---------------------------------------------------------------------------- RNG
def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------- save / load
class CheckpointManager:
    """Saves and restores complete checkpoints of one run (every rank calls every method)."""

    def __init__(self, run_dir: str | Path, keep_last: int, rank: int, world_size: int,
                 barrier=lambda: None):
        self.root = checkpoints_root(run_dir)
        self.keep_last = keep_last
        self.rank, self.world_size = rank, world_size
        self.barrier = barrier

    def save(self, engine: Any, step: int, loader_state: dict, trainer_state: dict,
             static_files: dict[str, Any], fault=None) -> Path:
        """Write checkpoint ``step``; returns its directory once complete and pointed to.

        ``static_files`` maps a relative name to a ``str`` (written as text) or a callable taking the
        target path (directory writers such as ``tokenizer.save_pretrained``); rank 0 writes them.
        """
        tag = tag_for(step)
        ckpt = self.root / tag
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if ckpt.exists():  # a partial save, or a checkpoint of an abandoned timeline
                shutil.rmtree(ckpt)
        self.barrier()
        engine.save_checkpoint(str(self.root), tag=tag, save_latest=False)
        buf = _torch_bytes({"loader": loader_state, "rng": rng_state()})
        write_atomic(ckpt / f"rank{self.rank:05d}.pt", buf)
        if fault is not None:
            fault.maybe("kill_during_save", step)
        self.barrier()
        if self.rank == 0:
            for name, content in static_files.items():
                target = ckpt / name
                if callable(content):
                    content(target)
                else:
                    write_atomic(target, content)
            write_atomic(ckpt / TRAINER_STATE, json.dumps({**trainer_state, "step": step,
                                                           "world_size": self.world_size}, indent=2))
            write_atomic(ckpt / COMPLETE, json.dumps({"step": step, "time": time.time()}))
            write_atomic(self.root / POINTER, tag)  # the commit point
            self.prune(keep=ckpt)
        self.barrier()
        return ckpt

    def prune(self, keep: Path) -> None:
        """Delete complete checkpoints beyond the newest ``keep_last`` and partial ones older than ``keep``."""
        ckpts = list_checkpoints(self.root)
        complete = [p for p in ckpts if is_complete(p)]
        doomed = complete[:-self.keep_last] if self.keep_last > 0 else []
        doomed += [p for p in ckpts if not is_complete(p) and step_of(p) < step_of(keep)]
        for p in doomed:
            if p != keep:
                shutil.rmtree(p, ignore_errors=True)

    def load(self, engine: Any, ckpt: Path) -> tuple[dict, dict]:
        """Restore DeepSpeed state and this rank's RNG; returns ``(trainer_state, loader_state)``."""
        meta = json.loads((ckpt / TRAINER_STATE).read_text())
        if meta.get("world_size") != self.world_size:
            raise CheckpointError(f"{ckpt}: written by {meta.get('world_size')} ranks, this run has "
                                  f"{self.world_size}; resume with the same number of ranks")
        load_path, _ = engine.load_checkpoint(str(ckpt.parent), tag=ckpt.name, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if load_path is None:
            raise CheckpointError(f"{ckpt}: DeepSpeed could not load it")
        state = torch.load(ckpt / f"rank{self.rank:05d}.pt", map_location="cpu", weights_only=False)
        set_rng_state(state["rng"])
        return meta, state["loader"]


def _torch_bytes(obj: Any) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def read_trainer_state(ckpt: Path) -> dict:
    return json.loads((Path(ckpt) / TRAINER_STATE).read_text())
