"""DeepSpeed JSON configs: data files whose batch and precision fields are filled from the YAML.

One source of truth per setting.  The training YAML owns everything a user tunes per run
(micro batch, accumulation, clipping, precision, optimizer, schedule); the JSON in ``ds_configs/``
owns the parallelism strategy (ZeRO stage, offload, buckets).  Fields the YAML owns may appear in the
JSON only as ``"auto"`` (filled here) or with exactly the value the YAML implies; anything else is a
:class:`~anygpt.config.ConfigError` before any process starts:

=================================== =============================================================
JSON field                          filled from
=================================== =============================================================
``train_micro_batch_size_per_gpu``  ``optim.micro_batch_size``
``gradient_accumulation_steps``     ``optim.grad_accum``
``train_batch_size``                ``micro_batch_size x grad_accum x world size`` (global batch)
``gradient_clipping``               ``optim.grad_clip``
``bf16.enabled`` / ``fp16.enabled`` ``optim.precision`` (``auto``: bf16 on CUDA, fp32 on CPU)
=================================== =============================================================

``optimizer`` and ``scheduler`` sections are refused: the trainer builds AdamW and the warmup +
cosine schedule from ``optim.*`` (a torch AdamW object compiles nothing on CPU, see PLATFORM.md).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from anygpt.config import ConfigError, TrainConfig

AUTO = "auto"
# ZeRO 1-3 only: their optimizers skip an update whose gradient norm is not finite, which is how a
# non-finite loss becomes a skipped step on every rank at once (stage 0 would apply it).
_STAGES = (1, 2, 3)


def resolve_precision(cfg: TrainConfig, cuda: bool) -> str:
    """``fp32`` | ``bf16`` | ``fp16`` for this run (``auto``: bf16 on CUDA, fp32 on CPU)."""
    p = cfg.optim.precision
    if p == "auto":
        return "bf16" if cuda else "fp32"
    if p == "fp16" and not cuda:
        raise ConfigError("optim.precision: fp16 needs CUDA (use fp32 or bf16 on CPU)")
    return p


def find_ds_json(path: str | Path) -> Path:
    """``path`` as given, else the shipped config it names (``ds_configs/zero3.json`` from any
    directory, also from an installed package)."""
    from anygpt.resources import resolve_config_path

    return resolve_config_path(path)


def load_ds_json(path: str | Path) -> dict[str, Any]:
    path = find_ds_json(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"optim.deepspeed: {path} not found") from None
    except OSError as e:
        raise ConfigError(f"optim.deepspeed: cannot read {path} ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"optim.deepspeed: {path} is not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"optim.deepspeed: {path} must hold a JSON object")
    return data


def _fill(ds: dict, key: str, value: Any, where: str, why: str) -> None:
    """Set ``ds[key]`` (dotted) to ``value`` when absent or "auto"; refuse a conflicting number."""
    *parents, leaf = key.split(".")
    node = ds
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"optim.deepspeed: {where}: {p} must be an object")
    current = node.get(leaf, AUTO)
    if current == AUTO:
        node[leaf] = value
    elif current != value and not (isinstance(current, (int, float)) and not isinstance(current, bool)
                                   and isinstance(value, (int, float)) and float(current) == float(value)):
        raise ConfigError(f"optim.deepspeed: {where}: {key}={current!r} but {why} gives {value!r} "
                          f"(use \"auto\" to take it from the YAML)")


def resolve_ds_config(cfg: TrainConfig, world_size: int, cuda: bool,
                      path: str | Path | None = None) -> dict[str, Any]:
    """The DeepSpeed config dict for this run: the JSON with every "auto" filled and checked.

    Args:
        cfg: the validated training config (``optim.deepspeed`` names the JSON unless ``path``).
        world_size: number of ranks (data-parallel size).
        cuda: whether the run uses CUDA (decides ``auto`` precision).
    """
    where = str(path or cfg.optim.deepspeed)
    ds = copy.deepcopy(load_ds_json(where))
    o = cfg.optim
    for section in ("optimizer", "scheduler"):
        if section in ds:
            raise ConfigError(f"optim.deepspeed: {where}: remove the {section!r} section; the trainer builds "
                              f"AdamW and the warmup+cosine schedule from optim.*")
    if world_size <= 0:
        raise ConfigError(f"world size must be > 0, got {world_size}")
    precision = resolve_precision(cfg, cuda)
    _fill(ds, "train_micro_batch_size_per_gpu", o.micro_batch_size, where, "optim.micro_batch_size")
    _fill(ds, "gradient_accumulation_steps", o.grad_accum, where, "optim.grad_accum")
    _fill(ds, "train_batch_size", o.micro_batch_size * o.grad_accum * world_size, where,
          f"optim.micro_batch_size {o.micro_batch_size} x optim.grad_accum {o.grad_accum} x world size {world_size}")
    _fill(ds, "gradient_clipping", o.grad_clip, where, "optim.grad_clip")
    _fill(ds, "bf16.enabled", precision == "bf16", where, f"precision {precision}")
    _fill(ds, "fp16.enabled", precision == "fp16", where, f"precision {precision}")
    zero = ds.get("zero_optimization")
    if not isinstance(zero, dict) or zero.get("stage") not in _STAGES:
        raise ConfigError(f"optim.deepspeed: {where}: zero_optimization.stage must be one of {list(_STAGES)}")
    for key, value in _find_autos(ds):
        raise ConfigError(f"optim.deepspeed: {where}: {key} is \"auto\" but the trainer fills only the batch, "
                          f"clipping and precision fields")
    offload = zero.get("offload_optimizer", {}).get("device", "none") not in (None, "none")
    if offload and not cuda:
        # A torch AdamW on CPU-resident partitions; DeepSpeed insists on its compiled CPU Adam otherwise.
        ds["zero_force_ds_cpu_optimizer"] = False
    ds.setdefault("steps_per_print", 2**31 - 1)  # the trainer logs; silence DeepSpeed's own progress lines
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def _find_autos(node: Any, prefix: str = ""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _find_autos(v, f"{prefix}{k}.")
    elif node == AUTO:
        yield prefix.rstrip("."), node


def zero_stage(ds: dict[str, Any]) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def offloads_optimizer(ds: dict[str, Any]) -> bool:
    return ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none") not in (None, "none")
