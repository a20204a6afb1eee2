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


def check_shard_codecs(cfg: TrainConfig, layout: object) -> None:
    """The first sample of each source's first local shard was made with the layout's codecs.

    Codes of another codec can lie inside a range by value (Mimi's ids below 1024 in a SpeechTokenizer
    model) and would train the model on meaningless tokens; this one read per source catches a mixed-up
    shard set before any rank starts (the loader also skips such samples one by one, ``codec_mismatch``).
    """
    from anygpt.data import ShardError, expand_shards
    from anygpt.data.schema import SampleError, decode_sample
    from anygpt.data.shards import iter_shard_samples

    specs = [(f"data.sources[{i}] ({s.name})", s.shards) for i, s in enumerate(cfg.data.sources)]
    if cfg.data.eval_shards:
        specs.append(("data.eval_shards", cfg.data.eval_shards))
    for key, spec in specs:
        first = expand_shards(spec)[0]
        if ":" in first.split("/")[0]:  # a URL (pipe:, s3:, https:): not opened before training
            continue
        try:
            sample = decode_sample(next(iter(iter_shard_samples(first)), {}))
        except (ShardError, SampleError, StopIteration):
            continue  # unreadable data is the loader's to count and report
        for member, entry in (sample.meta.get("media") or {}).items():
            m = entry.get("modality") if isinstance(entry, dict) else None
            spec_m = layout.modalities.get(m)
            made = entry.get("codec") if isinstance(entry, dict) else None
            if spec_m is not None and made and spec_m.codec and made != spec_m.codec:
                raise ConfigError(f"{key}: {first} holds {m} codes made with {made}, but the model's {m} range "
                                  f"is for {spec_m.codec}; preprocess with the model's codecs")


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
    _, layout = run_tokenizer(cfg, source, ckpt)  # layout read back and checked against model.codecs
    check_shard_codecs(cfg, layout)
    return Plan(ds, source, ckpt, world_size, cuda, attention)
