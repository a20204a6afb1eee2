"""Export: ZeRO shards of a checkpoint -> a Hugging Face model directory that plain transformers loads.

``anygpt export --checkpoint RUN_OR_CKPT_DIR --out HF_DIR`` writes::

    HF_DIR/config.json, model.safetensors     consolidated fp32 weights (or --dtype), LoRA merged
    HF_DIR/tokenizer.json, tokenizer_config.json, ...   the run's tokenizer, layout tokens included
    HF_DIR/vocab_layout.json                  the vocabulary layout
    HF_DIR/cards/<modality>.yaml              the codec card of each modality of the layout (from the
                                              run's codecs dir when it has it, else the card of the
                                              codec the layout records)
    HF_DIR/codecs/                            a copy of ``model.codecs`` when the run named one
    HF_DIR/anygpt_export.json                 provenance: checkpoint, step, dtype, LoRA merged

Consolidation reads every rank's partition with DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint``
(always with an explicit ``tag``) in one process, without a process group.  The model skeleton is
built on the ``meta`` device from the checkpoint's ``hf_config`` and the weights are assigned into it,
so exporting needs host memory for one fp32 copy of the weights, not two.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from anygpt.train.checkpoint import TRAINER_STATE, resolve_checkpoint

EXPORT_META = "anygpt_export.json"
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ExportError(ValueError):
    pass


def consolidated_state_dict(ckpt: str | Path) -> dict[str, torch.Tensor]:
    """Full fp32 state dict of checkpoint ``ckpt`` (a ``step-*`` directory), keys as in the trained module."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ckpt = Path(ckpt)
    state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    return dict(state)


def _copy_cards(out: Path, layout: Any, codecs: Path | None) -> list[str]:
    """Write ``out/cards/<modality>.yaml`` for every modality of the layout; returns their names."""
    import yaml

    from anygpt import modalities as registry
    from anygpt.modalities.cards import CARD_FILE

    cards = out / "cards"
    cards.mkdir(parents=True, exist_ok=True)
    for name, spec in layout.modalities.items():
        src = codecs / name / CARD_FILE if codecs is not None else None
        if src is not None and src.is_file():
            shutil.copy2(src, cards / f"{name}.yaml")
            continue
        card = registry.codec_card(name, spec.codec) if name in registry.names() else None
        if card is not None:
            data = {k: v for k, v in card.items() if not k.startswith("_")}
            (cards / f"{name}.yaml").write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True),
                                                encoding="utf-8")
    return sorted(p.stem for p in cards.glob("*.yaml"))


def export_checkpoint(checkpoint: str | Path, out: str | Path, dtype: str | None = None) -> dict[str, Any]:
    """Consolidate ``checkpoint`` (run dir, ``checkpoints/`` dir or one checkpoint) into ``out``.

    Args:
        checkpoint: where to find a *complete* checkpoint (the run's newest when given a run dir).
        out: the Hugging Face directory to write (created; existing model files are overwritten).
        dtype: ``fp32`` | ``bf16`` | ``fp16``; default: the run's training precision.

    Returns:
        The provenance record also written to ``out/anygpt_export.json``.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from anygpt.train.checkpoint import CheckpointError

    try:
        ckpt = resolve_checkpoint(checkpoint)
    except CheckpointError as e:
        raise ExportError(f"--checkpoint: {e}") from None
    meta = json.loads((ckpt / TRAINER_STATE).read_text())
    dtype = dtype or meta.get("precision", "fp32")
    if dtype not in _DTYPES:
        raise ExportError(f"--dtype: {dtype!r} is not one of {sorted(_DTYPES)}")
    out = Path(out)
    state = consolidated_state_dict(ckpt)
    config = AutoConfig.from_pretrained(str(ckpt / "hf_config"))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    lora = meta.get("lora")
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                                                 target_modules=list(lora["target_modules"]), task_type="CAUSAL_LM"))
    expected = dict(model.named_parameters())
    missing = [k for k in expected if k not in state]
    if missing:
        raise ExportError(f"{ckpt}: consolidated weights lack {len(missing)} parameter(s), e.g. {missing[0]}")
    model.load_state_dict({k: state[k] for k in expected}, strict=False, assign=True)
    if lora:
        model = model.merge_and_unload()
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model = model.to(_DTYPES[dtype])
    model.config.use_cache = True
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    # Tokenizer (with the layout's added tokens) and layout, exactly as trained.
    for item in (ckpt / "tokenizer").iterdir():
        if item.is_file():
            shutil.copy2(item, out / item.name)
    shutil.copy2(ckpt / "vocab_layout.json", out / "vocab_layout.json")
    codecs = Path(meta["codecs"]) if meta.get("codecs") else None
    if codecs is not None and codecs.is_dir():
        shutil.copytree(codecs, out / "codecs", dirs_exist_ok=True)
    from anygpt.layout import VocabLayout

    cards = _copy_cards(out, VocabLayout.load(out), codecs if codecs is not None and codecs.is_dir() else None)
    record = {"checkpoint": str(ckpt.resolve()), "step": meta.get("step"), "dtype": dtype,
              "lora_merged": bool(lora), "cards": cards, "codecs": "codecs" if (out / "codecs").is_dir() else None,
              "model": meta.get("model")}
    (out / EXPORT_META).write_text(json.dumps(record, indent=2))
    return record
