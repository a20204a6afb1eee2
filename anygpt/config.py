"""Typed configuration: dataclass schema + YAML + dotted ``key=value`` overrides.

Every mistake (unknown key, wrong type, inconsistent values) becomes one :class:`ConfigError` whose
message names the key, raised before any model, process group or data loader is created.  The
resolved config is written back as YAML (``RUN_DIR/config.yaml``) and can be re-run as is.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """An invalid configuration; the message names the offending key."""


# ---------------------------------------------------------------------------- generic machinery
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert ``value`` against the annotation ``tp``; raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {_type_name(tp)}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        _, val_tp = typing.get_args(tp) or (Any, Any)
        return {str(k): _coerce(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 1e-4 as a string (YAML 1.1 needs a dot)
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    for k in data:
        if k not in names:
            raise ConfigError(f"{prefix}{k}: unknown key (known: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}{k}") for k, v in data.items()}
    try:
        obj = cls(**kwargs)
    except TypeError as e:  # a required field is missing
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.init and f.name not in kwargs and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        raise ConfigError(f"{prefix}{missing[0] if missing else '?'}: required key missing") from e
    return obj


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` strings (value parsed as YAML) to a nested mapping."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{item}: override must look like key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            if isinstance(node, list):
                try:
                    node = node[int(p)]
                    continue
                except (ValueError, IndexError):
                    raise ConfigError(f"{key}: no list item {p!r}") from None
            node = node.setdefault(p, {})
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"{key}: {p} is not a section")
        if isinstance(node, list):
            try:
                node[int(parts[-1])] = value
            except (ValueError, IndexError):
                raise ConfigError(f"{key}: no list item {parts[-1]!r}") from None
        else:
            node[parts[-1]] = value
    return data


def load_yaml(path: str | Path) -> dict:
    """A YAML mapping from ``path``, or from the shipped config it names (``tiny_cpu``,
    ``launch/configs/stage1_pretrain.yaml`` from any directory; :mod:`anygpt.resources`)."""
    from anygpt.resources import resolve_config_path

    path = resolve_config_path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data


# ---------------------------------------------------------------------------- training schema
@dataclass
class RunConfig:
    dir: str = "runs/tiny"
    """Run directory: checkpoints, metrics.jsonl, config.yaml, TensorBoard events, loss curves."""
    max_steps: int = 100
    save_every: int = 50
    log_every: int = 10
    eval_every: int = 0
    """Evaluate on ``data.eval_shards`` every N steps (0 = only at the end when eval shards exist)."""
    eval_max_batches: int = 0
    """Batches per rank and evaluation (0 = the whole held-out set)."""
    seed: int = 0
    keep_last: int = 2
    """Checkpoints to keep (older complete ones are deleted after a newer one is complete)."""
    max_nonfinite: int = 3
    """Stop after this many non-finite losses in a row (each one is skipped and logged)."""
    tensorboard: bool = True
    wandb: bool = False
    """Also log to Weights & Biases when the ``wandb`` package is installed (a warning otherwise)."""
    wandb_project: str = "anygpt"
    progress: bool = True
    """Rank-0 progress bar (steps, tokens/s, ETA) on stderr."""


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class ModelConfig:
    name: str = "tiny"
    """``tiny`` (random, small, for tests/demo), a local HF model directory (base LLaMA or an export), or a
    training run/checkpoint directory (its weights; optimizer, schedule and data position start fresh)."""
    tokenizer: str | None = None
    """Tokenizer directory; defaults to the model directory (required for ``tiny``)."""
    activation_checkpointing: bool = False
    attention: Literal["auto", "mask4d", "flex", "flash_varlen"] = "auto"
    """Attention over packed rows (examples never see each other): ``mask4d`` (a boolean ``[B, 1, L, L]``
    mask through SDPA; trains everywhere), ``flex`` (FlexAttention block mask from the segment ids; trains on
    GPUs), ``flash_varlen`` (flash-attn's varlen kernels from cumulative lengths; CUDA + ``flash_attn``), or
    ``auto``: the first of flash_varlen, flex, mask4d that trains on this device (mask4d on CPU).  A path that
    cannot train here is a config error before any rank starts.  See :mod:`anygpt.attention`."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    codecs: str | None = None
    """Codecs directory the data was made with (one subdirectory per modality); its cards size a new
    layout's ranges, are checked against a read one, and the directory is copied into exports."""
    modalities: list[str] | None = None
    """Modalities of a *new* layout (default: every registered one), e.g. ``[speech]`` for a
    speech-only model; a layout read from a checkpoint or tokenizer must hold exactly these."""


ATTENTION_CHOICES: tuple[str, ...] = typing.get_args(typing.get_type_hints(ModelConfig)["attention"])
"""``model.attention`` values (``auto`` first), read from the schema so CLI choices never drift from it."""


@dataclass
class SourceConfig:
    name: str
    shards: str
    """Shard paths: a file, glob, brace pattern (``data-{000000..000009}.tar``) or ``pipe:`` URL."""
    weight: float = 1.0
    kind: Literal["pretrain", "sft"] = "pretrain"
    x2text_prob: float = 0.5
    """Stage 1: probability of rendering media->text (else text->media)."""


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=list)
    eval_shards: str | None = None
    seq_len: int = 512
    loss: Literal["all", "assistant"] = "all"
    """``all``: loss on the whole sequence (stage 1, as AnyGPT); ``assistant``: assistant turns only."""
    system_prompt: str | None = None
    shuffle_buffer: int = 256
    num_workers: int = 0


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 10
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 1.0
    micro_batch_size: int = 4
    grad_accum: int = 1
    deepspeed: str = "ds_configs/zero3.json"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """``auto``: bf16 on CUDA, fp32 on CPU."""


@dataclass
class TrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def validate(self) -> "TrainConfig":
        """Cross-field checks; every message names a key."""
        r, o, d = self.run, self.optim, self.data
        for key, value in [("run.max_steps", r.max_steps), ("run.save_every", r.save_every),
                           ("run.log_every", r.log_every), ("run.keep_last", r.keep_last),
                           ("optim.micro_batch_size", o.micro_batch_size), ("optim.grad_accum", o.grad_accum),
                           ("data.seq_len", d.seq_len), ("run.max_nonfinite", r.max_nonfinite)]:
            if value <= 0:
                raise ConfigError(f"{key}: must be > 0, got {value}")
        for key, value in [("run.eval_every", r.eval_every), ("run.eval_max_batches", r.eval_max_batches)]:
            if value < 0:
                raise ConfigError(f"{key}: must be >= 0, got {value}")
        if o.lr <= 0 or o.min_lr < 0 or o.min_lr > o.lr:
            raise ConfigError(f"optim.min_lr: need 0 <= min_lr <= lr (lr={o.lr}, min_lr={o.min_lr})")
        if o.warmup_steps < 0 or o.warmup_steps > r.max_steps:
            raise ConfigError(f"optim.warmup_steps: must be within [0, run.max_steps={r.max_steps}], got {o.warmup_steps}")
        if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
            raise ConfigError(f"optim.betas: need two values in [0, 1), got {o.betas}")
        if o.grad_clip < 0:
            raise ConfigError(f"optim.grad_clip: must be >= 0, got {o.grad_clip}")
        if not d.sources:
            raise ConfigError("data.sources: at least one source is required")
        names = set()
        for i, s in enumerate(d.sources):
            if s.name in names:
                raise ConfigError(f"data.sources[{i}].name: duplicate source name {s.name!r}")
            names.add(s.name)
            if s.weight <= 0:
                raise ConfigError(f"data.sources[{i}].weight: must be > 0, got {s.weight}")
            if not 0.0 <= s.x2text_prob <= 1.0:
                raise ConfigError(f"data.sources[{i}].x2text_prob: must be in [0, 1], got {s.x2text_prob}")
        if self.model.name == "tiny" and not self.model.tokenizer:
            raise ConfigError("model.tokenizer: required when model.name is 'tiny' (no model directory to read it from)")
        if self.model.modalities is not None:
            from anygpt import modalities as registry

            known = registry.names()
            bad = [m for m in self.model.modalities if m not in known]
            if bad or not self.model.modalities:
                raise ConfigError(f"model.modalities: {bad or '[]'} -- choose a non-empty subset of {list(known)}")
        lora = self.model.lora
        if lora.enabled and (lora.r <= 0 or lora.alpha <= 0 or not lora.target_modules):
            raise ConfigError("model.lora: enabled LoRA needs r > 0, alpha > 0 and target_modules")
        return self


def load_train_config(path: str | Path | None, overrides: list[str] | None = None,
                      base: dict | None = None) -> TrainConfig:
    """YAML file (or ``base`` mapping) + dotted overrides -> validated :class:`TrainConfig`."""
    data = load_yaml(path) if path is not None else dict(base or {})
    data = apply_overrides(data, list(overrides or []))
    return from_dict(TrainConfig, data).validate()


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True), encoding="utf-8")
