"""Distributed runtime and the DeepSpeed engine: process group, model under ZeRO init, LoRA, AdamW.

The same code runs on a GPU cluster (NCCL, bf16) and on a laptop or CI runner (gloo, fp32); nothing
here assumes one node: ranks, local ranks and world size come from the launcher's environment
(``deepspeed``, ``torchrun``, SLURM via either), and a plain ``python`` process is a world of one.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from anygpt.attention import set_attention
from anygpt.config import ConfigError, TrainConfig
from anygpt.train.dsconfig import offloads_optimizer, resolve_precision, zero_stage

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---------------------------------------------------------------------------- process group
@dataclass
class Runtime:
    """Where this process sits: rank, world, device, precision."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def world_from_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the launcher's environment; (0, 1, 0) for a plain process."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def _quiet_known_warnings() -> None:
    # torch 2.13 warns on every ZeRO collective (PLATFORM.md); one line per step drowns the log.
    for pattern in (".*reduce_scatter_tensor.*", ".*all_gather_into_tensor.*", ".*_reduce_scatter_base.*",
                    ".*_all_gather_base.*", ".*torch.distributed.*deprecated.*"):
        warnings.filterwarnings("ignore", message=pattern)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def _skip_cpu_shm_comm() -> None:
    """Keep DeepSpeed from compiling its shared-memory allreduce extension on CPU.

    On the CPU accelerator ``init_distributed`` builds ``deepspeed_shm_comm`` the first time
    (~30 s and ~2 GB RAM on 2 cores, PLATFORM.md) only to speed up intra-node allreduce; gloo is
    correct and fast enough for the tiny CPU runs (tests, demo).  ``ANYGPT_DS_SHM=1`` keeps it.
    """
    if os.environ.get("ANYGPT_DS_SHM") == "1":
        return
    try:
        import deepspeed.ops as ops

        ops.__compatible_ops__["deepspeed_shm_comm"] = False
    except Exception:  # a DeepSpeed without this registry builds nothing either
        pass


def init_runtime() -> Runtime:
    """Initialise the process group (NCCL on CUDA, gloo on CPU) once; idempotent."""
    cuda = torch.cuda.is_available()
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if cuda else "cpu")
    if "RANK" not in os.environ:  # plain `python launch/train.py`: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    os.environ.setdefault("LOCAL_RANK", "0")
    _quiet_known_warnings()
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    rank, world, local_rank = world_from_env()
    if cuda:
        torch.cuda.set_device(local_rank)
    else:
        _skip_cpu_shm_comm()
    backend = "nccl" if cuda else "gloo"
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return Runtime(torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank, device, backend)


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


# ---------------------------------------------------------------------------- model sources
@dataclass
class ModelSource:
    """What ``model.name`` points at: a named config, a Hugging Face directory, or one of our checkpoints."""

    kind: str  # "named" | "hf" | "checkpoint"
    path: str
    tokenizer_dir: str | None


def resolve_model_source(cfg: TrainConfig) -> ModelSource:
    """Classify ``model.name`` and find the tokenizer; ConfigError naming the key otherwise."""
    from anygpt.model import NAMED_CONFIGS
    from anygpt.train.checkpoint import CheckpointError, resolve_checkpoint

    name, tok = cfg.model.name, cfg.model.tokenizer
    if name in NAMED_CONFIGS:
        source = ModelSource("named", name, tok)
    else:
        path = Path(name)
        if not path.is_dir():
            raise ConfigError(f"model.name: {name!r} is neither a named config ({sorted(NAMED_CONFIGS)}) "
                              f"nor an existing directory")
        if (path / "config.json").is_file():
            source = ModelSource("hf", str(path), tok or str(path))
        else:
            try:
                ckpt = resolve_checkpoint(path)
            except CheckpointError:
                raise ConfigError(f"model.name: {path} holds neither a Hugging Face model (config.json) "
                                  f"nor a complete training checkpoint") from None
            meta = json.loads((ckpt / "trainer_state.json").read_text())
            if meta.get("lora"):
                raise ConfigError(f"model.name: {ckpt} was trained with LoRA; run `anygpt export` on it "
                                  f"(merges the adapters) and start from the export")
            source = ModelSource("checkpoint", str(ckpt), tok or str(ckpt / "tokenizer"))
    if source.tokenizer_dir is None:
        raise ConfigError(f"model.tokenizer: required when model.name is {name!r}")
    if not Path(source.tokenizer_dir).is_dir():
        raise ConfigError(f"model.tokenizer: {source.tokenizer_dir} is not a directory")
    return source


LLAMA_MODULES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"}


def check_lora_targets(cfg: TrainConfig, source: ModelSource) -> None:
    """LoRA target module names must exist in the model family (checked for LLaMA-type models)."""
    lora = cfg.model.lora
    if not lora.enabled:
        return
    model_type = "llama"
    cfg_file = Path(source.path) / ("config.json" if source.kind == "hf" else "hf_config/config.json")
    if source.kind != "named" and cfg_file.is_file():
        model_type = json.loads(cfg_file.read_text()).get("model_type", "llama")
    if model_type == "llama":
        unknown = [m for m in lora.target_modules if m not in LLAMA_MODULES]
        if unknown:
            raise ConfigError(f"model.lora.target_modules: {unknown} not in a LLaMA model "
                              f"(known: {sorted(LLAMA_MODULES)})")


# ---------------------------------------------------------------------------- model + engine
def _preimport_model_code() -> None:
    # Importing transformers' model code imports torch._dynamo, which fails inside zero.Init (DeepSpeed
    # patches tensor constructors there).  Import it before any ZeRO-3 construction.
    import torch._dynamo  # noqa: F401
    from transformers import AutoModelForCausalLM, LlamaForCausalLM  # noqa: F401


def _load_checkpoint_weights(model: torch.nn.Module, ckpt: Path, rt: Runtime) -> None:
    """Copy a checkpoint's consolidated fp32 weights into ``model`` (partitioned under ZeRO-3 or not).

    Under ZeRO-3 only rank 0 consolidates (host memory for one copy of the model, not one per rank)
    and each parameter is gathered, written on rank 0 and re-partitioned.
    """
    from anygpt.train.export import consolidated_state_dict

    partitioned = any(hasattr(p, "ds_id") for p in model.parameters())
    state = consolidated_state_dict(ckpt) if (rt.is_main or not partitioned) else {}
    import deepspeed

    for name, param in model.named_parameters():
        ctx = deepspeed.zero.GatheredParameters([param], modifier_rank=0) if partitioned else contextlib.nullcontext()
        with ctx, torch.no_grad():
            if rt.is_main or not partitioned:
                if name not in state:
                    raise ConfigError(f"model.name: checkpoint {ckpt} has no weight {name!r}")
                param.data.copy_(state[name].to(param.dtype))


def build_model(cfg: TrainConfig, source: ModelSource, tokenizer: Any, layout: Any, ds_config: dict,
                rt: Runtime, attention: str = "mask4d") -> tuple[torch.nn.Module, Any]:
    """The causal LM, partitioned at construction under ZeRO-3, sized to the layout, with the attention
    implementation of ``attention`` (a resolved :data:`anygpt.attention.PATHS` entry), LoRA-wrapped if asked.

    Returns ``(model, hf_deepspeed_config)``; keep the second alive as long as the model (transformers
    checks it to know ZeRO-3 is on).
    """
    from anygpt import model as lm

    dtype = DTYPES[resolve_precision(cfg, rt.cuda)]
    keep_alive = None
    if zero_stage(ds_config) == 3:
        from transformers.integrations import HfDeepSpeedConfig

        _preimport_model_code()
        keep_alive = HfDeepSpeedConfig(ds_config)  # from_pretrained/_from_config now build under zero.Init
    if source.kind == "hf" or (source.kind == "named" and keep_alive is None):
        model = lm.build_model(source.path, layout, tokenizer, dtype=dtype, seed=cfg.run.seed)
    else:
        from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM

        torch.manual_seed(cfg.run.seed)
        if source.kind == "named":
            # anygpt.model.build_model calls LlamaForCausalLM(config), whose weight init indexes
            # parameters that zero.Init has already partitioned; _from_config builds under zero.Init.
            config = lm.llama_config(source.path, layout.base_vocab_size, tokenizer)
            model = LlamaForCausalLM._from_config(config, dtype=dtype)
        else:
            config = AutoConfig.from_pretrained(str(Path(source.path) / "hf_config"))
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
            _load_checkpoint_weights(model, Path(source.path), rt)
        lm.resize_to_layout(model, layout)
    model.config.use_cache = False
    set_attention(model, attention)
    if cfg.model.activation_checkpointing:
        # Non-reentrant checkpointing works with ZeRO-3 hooks and frozen (LoRA) inputs alike.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.model.lora.enabled:
        from peft import LoraConfig, get_peft_model

        lc = cfg.model.lora
        model = get_peft_model(model, LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                                                 target_modules=list(lc.target_modules), task_type="CAUSAL_LM"))
    return model, keep_alive


def _shape(p: torch.nn.Parameter) -> torch.Size:
    return getattr(p, "ds_shape", p.shape)  # ZeRO-3 partitions leave p.shape == (0,)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only; never on norms, biases (1-D) or frozen parameters."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if len(_shape(p)) >= 2 and weight_decay > 0 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module, ds_config: dict, rt: Runtime) -> torch.optim.Optimizer:
    """AdamW: torch's (compiles nothing), or DeepSpeed's CPU Adam when offloading from a GPU run.

    DeepSpeed's own ``"optimizer": {"type": "AdamW"}`` selects FusedAdam, which compiles a CUDA/C++
    extension at first use (PLATFORM.md); torch's fused AdamW is as fast on GPU partitions.
    """
    o = cfg.optim
    groups = param_groups(model, o.weight_decay)
    kwargs = dict(lr=o.lr, betas=tuple(o.betas), eps=1e-8, weight_decay=o.weight_decay)
    if offloads_optimizer(ds_config) and rt.cuda:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
    if rt.cuda and not offloads_optimizer(ds_config):
        kwargs["fused"] = True
    return torch.optim.AdamW(groups, **kwargs)


@dataclass
class EngineBundle:
    engine: Any
    model: torch.nn.Module
    hf_ds_config: Any
    trainable_params: int
    total_params: int


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    trainable = total = 0
    for p in model.parameters():
        n = int(torch.Size(_shape(p)).numel())
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def build_engine(cfg: TrainConfig, source: ModelSource, tokenizer: Any, layout: Any, ds_config: dict,
                 rt: Runtime, attention: str = "mask4d") -> EngineBundle:
    """Model + AdamW + warmup/cosine schedule wrapped by ``deepspeed.initialize``."""
    import deepspeed

    from anygpt.train.schedule import scheduler_factory

    model, keep_alive = build_model(cfg, source, tokenizer, layout, ds_config, rt, attention)
    trainable, total = count_params(model)
    optimizer = build_optimizer(cfg, model, ds_config, rt)
    o = cfg.optim
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=ds_config, dist_init_required=False,
        lr_scheduler=scheduler_factory(o.lr, o.min_lr, o.warmup_steps, cfg.run.max_steps))
    return EngineBundle(engine, model, keep_alive, trainable, total)
