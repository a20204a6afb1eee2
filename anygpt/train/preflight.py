"""Every check that needs no process group and no model: run before any rank starts.

``anygpt train`` calls :func:`preflight` in the launching process, so a bad config is one
:class:`~anygpt.config.ConfigError` line before ``torchrun`` spawns anything; each rank calls it
again (cheap) because ``deepspeed launch/train.py`` starts the ranks before our code runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from anygpt.config import ConfigError, TrainConfig


@dataclass
class Plan:
    """What preflight resolved: the DeepSpeed dict, the model source, the checkpoint to resume, the
    attention path (``model.attention`` with ``auto`` resolved for this device)."""

    ds_config: dict
    source: object  # engine.ModelSource
    resume_from: Path | None
    world_size: int
    cuda: bool
    attention: str = "mask4d"


def run_tokenizer(cfg: TrainConfig, source: object, resume_from: Path | None = None) -> tuple[object, object]:
    """The run's tokenizer and vocabulary layout, *read back* where one was saved.

    Resume: the checkpoint's own ``tokenizer/`` and ``vocab_layout.json``.  Otherwise the tokenizer
    directory's (or the model directory's) ``vocab_layout.json`` when there is one (continued
    training, a stage-2 run, a prepared tokenizer), else the layout a release tokenizer's added
    tokens say, else a new default layout for ``model.modalities`` sized by ``model.codecs``' cards.
    ``model.codecs`` must match a read layout.  Every problem is one ConfigError line.
    """
    from anygpt import modalities as registry
    from anygpt.layout import LayoutError
    from anygpt.modalities import CodecError
    from anygpt.text_tokenizer import TokenizerError, prepare_tokenizer

    tok_dir = str(resume_from / "tokenizer") if resume_from is not None else source.tokenizer_dir
    dirs = [str(resume_from)] if resume_from is not None else ([source.path] if source.kind != "named" else [])
    try:
        cards = registry.directory_cards(cfg.model.codecs) if cfg.model.codecs else None
        return prepare_tokenizer(tok_dir, layout_dirs=dirs, modalities=cfg.model.modalities, cards=cards)
    except (LayoutError, CodecError, TokenizerError) as e:
        raise ConfigError(f"model: {e}") from None


def resolve_resume(cfg: TrainConfig, resume: str | None, world_size: int) -> Path | None:
    """``None`` (fresh run), ``"auto"`` (newest complete checkpoint of ``run.dir``, if any) or a path."""
    from anygpt.train.checkpoint import (CheckpointError, checkpoints_root, latest_checkpoint, read_trainer_state,
                                         resolve_checkpoint)

    root = checkpoints_root(cfg.run.dir)
    if resume is None:
        if latest_checkpoint(root) is not None:
            raise ConfigError(f"run.dir: {cfg.run.dir} already holds checkpoints; pass --resume auto to continue "
                              f"it or choose another run.dir")
        return None
    if resume == "auto":
        ckpt = latest_checkpoint(root)
        if ckpt is None:
            return None  # nothing to resume: a fresh run (partial dirs are replaced when saved again)
    else:
        try:
            ckpt = resolve_checkpoint(resume)
        except CheckpointError as e:
            raise ConfigError(f"--resume: {e}") from None
    state = read_trainer_state(ckpt)
    if state.get("world_size") != world_size:
        raise ConfigError(f"--resume: {ckpt} was written by {state.get('world_size')} ranks but this run has "
                          f"{world_size}; resume with the same number of ranks")
    if bool(state.get("lora")) != cfg.model.lora.enabled:
        raise ConfigError(f"--resume: {ckpt} was trained with model.lora.enabled={bool(state.get('lora'))}")
    return ckpt


def check_data(cfg: TrainConfig) -> None:
    from anygpt.data import ShardError, expand_shards

    for i, s in enumerate(cfg.data.sources):
        try:
            expand_shards(s.shards)
        except ShardError as e:
            raise ConfigError(f"data.sources[{i}].shards: {e}") from None
    if cfg.data.eval_shards:
        try:
            expand_shards(cfg.data.eval_shards)
        except ShardError as e:
            raise ConfigError(f"data.eval_shards: {e}") from None


def preflight(cfg: TrainConfig, world_size: int, resume: str | None = None, cuda: bool | None = None) -> Plan:
    """Validate everything checkable without processes or models; ConfigError (one line) otherwise."""
    from anygpt.attention import resolve_attention
    from anygpt.train.dsconfig import resolve_ds_config
    from anygpt.train.engine import check_lora_targets, resolve_model_source

    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    ds = resolve_ds_config(cfg, world_size, cuda)
    attention = resolve_attention(cfg.model.attention, "cuda" if cuda else "cpu", training=True)
    source = resolve_model_source(cfg)
    check_lora_targets(cfg, source)
    if cfg.model.codecs is not None and not Path(cfg.model.codecs).is_dir():
        raise ConfigError(f"model.codecs: {cfg.model.codecs} is not a directory")
    check_data(cfg)
    ckpt = resolve_resume(cfg, resume, world_size)
    run_tokenizer(cfg, source, ckpt)  # layout read back and checked against model.codecs
    return Plan(ds, source, ckpt, world_size, cuda, attention)
