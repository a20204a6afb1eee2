import pytest

from anygpt.config import ConfigError, load_train_config, save_config

BASE = {
    "model": {"name": "tiny", "tokenizer": "tok"},
    "data": {"sources": [{"name": "img", "shards": "data/img-{000000..000003}.tar", "weight": 2.0}]},
}


def load(overrides=(), base=BASE):
    import copy

    return load_train_config(None, list(overrides), base=copy.deepcopy(base))


def test_valid_config_and_overrides():
    cfg = load(["optim.lr=1e-4", "run.max_steps=20", "run.dir=/tmp/x", "data.sources.0.x2text_prob=0.25",
                "optim.betas=[0.9,0.99]"])
    assert cfg.optim.lr == 1e-4 and cfg.run.max_steps == 20 and cfg.run.dir == "/tmp/x"
    assert cfg.data.sources[0].x2text_prob == 0.25 and cfg.optim.betas == [0.9, 0.99]


@pytest.mark.parametrize("overrides,message", [
    (["optim.lrr=1"], r"^optim\.lrr: unknown key"),
    (["bogus.x=1"], r"^bogus: unknown key"),
    (["run.max_steps=ten"], r"^run\.max_steps: expected an integer, got 'ten'"),
    (["run.max_steps=2.5"], r"^run\.max_steps: expected an integer"),
    (["optim.lr=fast"], r"^optim\.lr: expected a number"),
    (["run.tensorboard=maybe"], r"^run\.tensorboard: expected true/false"),
    (["data.loss=some"], r"^data\.loss: 'some' is not one of"),
    (["run.max_steps=0"], r"^run\.max_steps: must be > 0"),
    (["optim.min_lr=1.0"], r"^optim\.min_lr: need 0 <= min_lr <= lr"),
    (["optim.warmup_steps=1000", "run.max_steps=10"], r"^optim\.warmup_steps: must be within"),
    (["data.sources.0.weight=0"], r"^data\.sources\[0\]\.weight: must be > 0"),
    (["data.sources.0.x2text_prob=1.5"], r"^data\.sources\[0\]\.x2text_prob"),
    (["data.sources=[]"], r"^data\.sources: at least one source"),
    (["model.tokenizer=null"], r"^model\.tokenizer: required"),
    (["run.max_steps"], r"must look like key=value"),
    (["data.sources.5.weight=1"], r"no list item '5'"),
])
def test_bad_configs_give_one_line_errors(overrides, message):
    with pytest.raises(ConfigError, match=message) as e:
        load(overrides)
    assert "\n" not in str(e.value)


def test_missing_required_and_bad_yaml(tmp_path):
    bad = {"model": BASE["model"], "data": {"sources": [{"name": "x"}]}}
    with pytest.raises(ConfigError, match=r"^data\.sources\[0\]\.shards: required key missing"):
        load(base=bad)
    p = tmp_path / "c.yaml"
    p.write_text("run: [unclosed")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_train_config(p)
    with pytest.raises(ConfigError, match="cannot read config"):
        load_train_config(tmp_path / "missing.yaml")


def test_resolved_config_round_trips(tmp_path):
    cfg = load(["optim.lr=2e-4"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_train_config(tmp_path / "config.yaml") == cfg
