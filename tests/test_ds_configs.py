"""Every DeepSpeed JSON in ds_configs/ and every stage YAML in launch/configs/ loads and validates, and
the batch arithmetic (micro x accumulation x world = global) holds however they are combined."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from anygpt.config import ConfigError, TrainConfig, load_train_config
from anygpt.train.dsconfig import load_ds_json, resolve_ds_config, zero_stage

REPO = Path(__file__).resolve().parents[1]
DS_FILES = sorted((REPO / "ds_configs").glob("*.json"))
# The LM's stage YAMLs; soundstorm.yaml is the SoundStorm trainer's schema (validated in tests/test_soundstorm.py),
# align_*.yaml the alignment stage's (validated in tests/test_align_run.py).
YAML_FILES = sorted(p for p in (REPO / "launch" / "configs").glob("*.yaml")
                    if p.name != "soundstorm.yaml" and not p.name.startswith("align_"))


def test_the_expected_files_exist():
    assert {p.name for p in DS_FILES} >= {"zero3.json", "zero3_offload.json", "zero2.json"}
    assert {p.name for p in YAML_FILES} >= {"stage1_pretrain.yaml", "stage2_sft.yaml", "stage3_lora.yaml",
                                            "tiny_cpu.yaml"}
    assert TrainConfig().optim.deepspeed == "ds_configs/zero3.json"  # ZeRO-3 by default


@pytest.mark.parametrize("path", DS_FILES, ids=lambda p: p.name)
def test_ds_json_is_data_the_yaml_completes(path):
    raw = load_ds_json(path)
    assert zero_stage(raw) in (1, 2, 3)
    assert "optimizer" not in raw and "scheduler" not in raw  # built from optim.* by the trainer
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
                "gradient_clipping"):
        assert raw.get(key, "auto") == "auto", key  # owned by the YAML
    if "offload" in path.name:
        z = raw["zero_optimization"]
        assert z["offload_optimizer"]["device"] == "cpu" and z["offload_param"]["device"] == "cpu"


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.name)
def test_stage_yaml_validates_and_opens_with_its_launch_command(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and "launch/train.py" in first and f"--config launch/configs/{path.name}" in first
    cfg = load_train_config(path)
    assert (REPO / cfg.optim.deepspeed).is_file()
    if path.name == "stage2_sft.yaml" or path.name == "stage3_lora.yaml":
        assert cfg.data.loss == "assistant" and all(s.kind == "sft" for s in cfg.data.sources)
    if path.name == "stage1_pretrain.yaml":
        assert cfg.data.loss == "all" and all(s.kind == "pretrain" for s in cfg.data.sources)
    assert cfg.model.lora.enabled == (path.name == "stage3_lora.yaml")


@pytest.mark.parametrize("ds_path", DS_FILES, ids=lambda p: p.name)
@pytest.mark.parametrize("yaml_path", YAML_FILES, ids=lambda p: p.name)
@pytest.mark.parametrize("world", [1, 2, 8, 32])
def test_batch_arithmetic_for_every_combination(yaml_path, ds_path, world):
    cfg = load_train_config(yaml_path, [f"optim.deepspeed={ds_path}"])
    for cuda in (False, True):
        if cuda is False and cfg.optim.precision == "fp16":
            continue
        ds = resolve_ds_config(cfg, world, cuda)
        o = cfg.optim
        assert ds["train_micro_batch_size_per_gpu"] == o.micro_batch_size
        assert ds["gradient_accumulation_steps"] == o.grad_accum
        assert ds["train_batch_size"] == o.micro_batch_size * o.grad_accum * world
        assert ds["gradient_clipping"] == o.grad_clip
        assert ds["bf16"]["enabled"] is (cuda and o.precision == "auto" or o.precision == "bf16")
        assert ds["fp16"]["enabled"] is (o.precision == "fp16")
        assert "auto" not in json.dumps(ds)


def test_concrete_values_must_agree_with_the_yaml(tmp_path):
    cfg = load_train_config(YAML_FILES[0])
    o = cfg.optim
    ok = {"train_batch_size": o.micro_batch_size * o.grad_accum * 4, "zero_optimization": {"stage": 3}}
    (tmp_path / "ok.json").write_text(json.dumps(ok))
    assert resolve_ds_config(cfg, 4, False, tmp_path / "ok.json")["train_batch_size"] == ok["train_batch_size"]
    with pytest.raises(ConfigError, match=r"train_batch_size=.* but optim\.micro_batch_size"):
        resolve_ds_config(cfg, 8, False, tmp_path / "ok.json")  # right for 4 ranks, wrong for 8
    bad = {"gradient_accumulation_steps": o.grad_accum + 1, "zero_optimization": {"stage": 2}}
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match=r"gradient_accumulation_steps"):
        resolve_ds_config(cfg, 1, False, tmp_path / "bad.json")
    other_auto = {"zero_optimization": {"stage": 3, "reduce_bucket_size": "auto"}}
    (tmp_path / "auto.json").write_text(json.dumps(other_auto))
    with pytest.raises(ConfigError, match=r"zero_optimization\.reduce_bucket_size is \"auto\""):
        resolve_ds_config(cfg, 1, False, tmp_path / "auto.json")


def test_cpu_offload_uses_torch_adamw_without_compiling():
    cfg = load_train_config(YAML_FILES[0], ["optim.deepspeed=ds_configs/zero3_offload.json"])
    assert resolve_ds_config(cfg, 2, cuda=False)["zero_force_ds_cpu_optimizer"] is False
    assert "zero_force_ds_cpu_optimizer" not in resolve_ds_config(cfg, 2, cuda=True)
