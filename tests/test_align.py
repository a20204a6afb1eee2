"""Alignment pieces on their own (no engine): the GRPO and DPO objectives against hand-computed values,
the token weighting, the Llasa CER/NLL utility, the guards, the composite reward (floor, failures), the
config's one-line errors, and the response log-probabilities against a plain full forward pass."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from anygpt.align import rewards as R
from anygpt.align.config import GuardConfig, RewardSpec, load_align_config
from anygpt.align.losses import dpo_loss, group_advantages, grpo_loss, sequence_logprobs, token_weights
from anygpt.align.rewards import CompositeReward, Reward, Sample, cer_nll_utility, guard_failure
from anygpt.config import ConfigError


# ---------------------------------------------------------------------------- GRPO
def test_group_advantages_by_hand():
    adv = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0]]), eps=1e-4)
    std = math.sqrt(4 * 0.25 / 3)  # unbiased std of (1, 0, 0, 1)
    a = 0.5 / (std + 1e-4)
    assert adv[0].tolist() == pytest.approx([a, -a, -a, a], rel=1e-6)
    assert adv[1].tolist() == [0.0, 0.0, 0.0, 0.0]  # equal rewards teach nothing
    assert group_advantages(torch.tensor([[3.0, 1.0]]), scale=False).tolist() == [[1.0, -1.0]]
    with pytest.raises(ValueError):
        group_advantages(torch.tensor([[1.0]]))


def test_grpo_loss_clipping_kl_and_gradient_by_hand():
    logp = torch.tensor([-1.0, -0.5, -2.0], requires_grad=True)
    old = torch.tensor([-1.2, -0.5, -1.0])
    adv = torch.tensor([1.0, 1.0, -1.0])
    w = torch.full((3,), 1 / 3)
    loss, stats = grpo_loss(logp, old, adv, w, clip_eps=0.2)
    # ratios e^0.2 = 1.221 (clipped to 1.2, A > 0), 1, e^-1 = 0.368 (A < 0: min(-0.368, -0.8) = -0.8)
    assert float(loss.detach()) == pytest.approx(-(1.2 + 1.0 - 0.8) / 3, abs=1e-6)
    assert float(stats["clipped"]) == pytest.approx(2 / 3)
    assert float(stats["ratio"]) == pytest.approx((math.exp(0.2) + 1 + math.exp(-1)) / 3, rel=1e-6)
    loss.backward()
    # clipped tokens carry no gradient; the unclipped one: d(-rho A w)/dlogp = -rho A w = -1/3
    assert logp.grad.tolist() == pytest.approx([0.0, -1 / 3, 0.0], abs=1e-7)

    ref = torch.tensor([-1.0, -1.0, -1.0])
    loss_kl, stats_kl = grpo_loss(logp.detach(), old, adv, w, clip_eps=0.2, kl_beta=0.1, ref_logp=ref)
    kl = [0.0, math.exp(-0.5) + 0.5 - 1, math.e - 2]  # k3: e^d - d - 1 with d = ref - logp = 0, -0.5, 1
    assert float(stats_kl["kl"]) == pytest.approx(sum(kl) / 3, rel=1e-6)
    assert float(loss_kl) == pytest.approx(-(1.4 - 0.1 * sum(kl)) / 3, rel=1e-6)
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(logp, old, adv, w, kl_beta=0.1)


def test_token_weights_token_and_sequence_normalisation():
    assert token_weights([2, 4], "token") == pytest.approx([1 / 6, 1 / 6])
    assert token_weights([2, 4], "sequence") == pytest.approx([1 / 4, 1 / 8])
    # a rank's part of a step: normalised by the step's totals over all ranks
    assert token_weights([2, 4], "token", total_tokens=12) == pytest.approx([1 / 12, 1 / 12])
    assert token_weights([2], "sequence", total_sequences=4) == pytest.approx([1 / 8])
    # every sequence sums to one under "sequence", every token weighs the same under "token"
    lengths = [3, 5, 1]
    assert sum(w * n for w, n in zip(token_weights(lengths, "sequence"), lengths)) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        token_weights([1], "word")


# ---------------------------------------------------------------------------- DPO
def test_dpo_loss_by_hand():
    pi_c, pi_r = torch.tensor([-10.0, -5.0]), torch.tensor([-12.0, -4.0])
    ref_c, ref_r = torch.tensor([-11.0, -5.0]), torch.tensor([-11.0, -5.0])
    losses, st = dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=0.5)
    # pair 0: beta ((-10 + 11) - (-12 + 11)) = 1; pair 1: 0.5 (0 - 1) = -0.5
    assert losses.tolist() == pytest.approx([math.log1p(math.exp(-1)), math.log1p(math.exp(0.5))], rel=1e-6)
    assert st["margin"].tolist() == pytest.approx([1.0, -0.5])
    assert st["accuracy"].tolist() == [1.0, 0.0]
    assert st["chosen_reward"].tolist() == pytest.approx([0.5, 0.0])
    assert st["rejected_reward"].tolist() == pytest.approx([-0.5, 0.5])
    smoothed, _ = dpo_loss(pi_c[:1], pi_r[:1], ref_c[:1], ref_r[:1], beta=0.5, label_smoothing=0.1)
    assert float(smoothed) == pytest.approx(0.9 * math.log1p(math.exp(-1)) + 0.1 * math.log1p(math.e), rel=1e-6)
    # RPO: + sft_weight x the chosen answer's NLL per token (pair 0: 10 nats over 4 tokens; pair 1: 5 over 2)
    rpo, st = dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=0.5, sft_weight=2.0, chosen_tokens=torch.tensor([4, 2]))
    assert rpo.tolist() == pytest.approx([math.log1p(math.exp(-1)) + 2.0 * 2.5, math.log1p(math.exp(0.5)) + 2.0 * 2.5])
    assert st["chosen_nll"].tolist() == pytest.approx([2.5, 2.5])
    with pytest.raises(ValueError, match="chosen_tokens"):
        dpo_loss(pi_c, pi_r, ref_c, ref_r, sft_weight=1.0)


def test_sequence_logprobs_sums_per_row():
    out = sequence_logprobs(torch.tensor([-1.0, -2.0, -0.5, -0.25]), torch.tensor([0, 0, 2, 2]), 3)
    assert out.tolist() == [-3.0, 0.0, -0.75]


# ---------------------------------------------------------------------------- rewards
def test_cer_nll_utility_is_the_weighted_harmonic_mean():
    value, u_c, u_n = cer_nll_utility(0.1, 1.5)  # lambda_c 0.6, lambda_n 0.4, beta_c 3, tau_n 3
    assert u_c == pytest.approx(1 - math.tanh(0.3)) and u_n == pytest.approx(math.exp(-0.5))
    assert value == pytest.approx(1.0 / (0.6 / u_c + 0.4 / u_n))
    assert cer_nll_utility(0.0, 0.0)[0] == pytest.approx(1.0)
    assert cer_nll_utility(1e9, 0.0)[0] == 0.0  # U_CER = 0: no harmonic mean


def _speech(frames: int, code: int | None = None, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.full((1, frames), code) if code is not None else rng.integers(0, 1024, (1, frames))


def test_guards_name_the_hack(tiny_layout):
    g = GuardConfig()  # 0.02-0.3 s per character, repeats up to 1.5 s; speech codes are 50 Hz
    text = "hello world"  # 10 characters
    assert guard_failure(Sample("speech", text, _speech(40)), g, tiny_layout) is None  # 0.8 s: 0.08 s/char
    assert guard_failure(Sample("speech", text, _speech(40), stop="budget"), g, tiny_layout) == "not_ended"
    assert guard_failure(Sample("speech", text, None), g, tiny_layout) == "no_span"
    assert guard_failure(Sample("speech", text, _speech(40), issues=1), g, tiny_layout) == "malformed"
    assert guard_failure(Sample("speech", text, _speech(5)), g, tiny_layout) == "too_fast"  # 0.01 s/char
    assert guard_failure(Sample("speech", text, _speech(200)), g, tiny_layout) == "too_slow"  # 0.4 s/char
    rep = _speech(140)
    rep[0, 20:100] = 7  # 80 frames = 1.6 s of one code
    assert guard_failure(Sample("speech", text, rep), g, tiny_layout) == "repetition"
    # a caption says nothing about duration; an image (fixed span length) repeats codes legitimately
    assert guard_failure(Sample("music", "a slow song", _speech(10)), g, tiny_layout) is None
    assert guard_failure(Sample("image", "a red circle", np.zeros((1, 32), dtype=np.int64)), g, tiny_layout) is None
    assert guard_failure(Sample("speech", text, _speech(40), stop="budget"), GuardConfig(require_end=False),
                         tiny_layout) is None


class _Const(Reward):
    def __init__(self, value, modalities=None, fail=False):
        self.value, self.modalities, self.fail = value, modalities, fail

    def score(self, samples):
        if self.fail:
            raise RuntimeError("model exploded\nsecond line")
        return [{"value": self.value, "extra": 2.0} for _ in samples]


def test_composite_reward_weights_floor_and_failures(tiny_layout, capsys):
    g = GuardConfig(floor=-1.0)
    comp = CompositeReward([("a", 0.5, _Const(1.0)), ("b", 2.0, _Const(0.25, modalities=("speech",)))], g,
                           tiny_layout)
    ok = Sample("speech", "hello world", _speech(40))
    cut = Sample("speech", "hello world", _speech(40), stop="budget")
    img = Sample("image", "a red circle", np.zeros((1, 32), dtype=np.int64))
    out = comp([ok, cut, img])
    assert out[0]["reward"] == pytest.approx(0.5 * 1.0 + 2.0 * 0.25)
    assert out[0]["parts"] == {"a": 1.0, "a/extra": 2.0, "b": 0.25, "b/extra": 2.0} and out[0]["guard"] is None
    assert out[1] == {"reward": -1.0, "parts": {}, "guard": "not_ended"}
    assert out[2]["reward"] == pytest.approx(0.5) and "b" not in out[2]["parts"]  # b does not score images
    broken = CompositeReward([("a", 1.0, _Const(1.0, fail=True))], g, tiny_layout)
    assert math.isnan(broken([ok])[0]["reward"])
    err = capsys.readouterr().err
    assert "reward a failed on 1 samples: model exploded" in err and "second line" not in err
    with pytest.raises(ConfigError, match="no reward scores image"):
        CompositeReward([("b", 1.0, _Const(0.0, modalities=("speech",)))], g, tiny_layout).check_modalities(
            ["image", "speech"])


def test_code_frequency_reward():
    reward = R.build_code_frequency({"modality": "speech", "codes": [3, 4]}, None)
    codes = np.array([[3, 4, 4, 9]])
    assert reward.score([Sample("speech", "x", codes), Sample("speech", "x", None)]) == [{"value": 0.75},
                                                                                       {"value": 0.0}]
    with pytest.raises(ConfigError, match="exactly one of code"):
        R.check_rewards([_spec("code_frequency", {"modality": "speech"})], None)
    with pytest.raises(ConfigError, match=r"align\.rewards\[0\]\.name: unknown reward 'wer'"):
        R.check_rewards([_spec("wer", {})], None)
    with pytest.raises(ConfigError, match=r"align\.rewards\[0\]\.options\.lambda: unknown option"):
        R.check_rewards([_spec("code_frequency", {"modality": "speech", "code": 1, "lambda": 2})], None)


def _spec(name, options):
    return RewardSpec(name=name, options=options)


def test_asr_reward_options_are_checked_without_loading(tmp_path, tiny_layout):
    ctx = R.RewardContext(tiny_layout, tmp_path, "tiny")
    with pytest.raises(ConfigError, match=r"^align\.rewards\[0\]\.options\.model .*no_asr: no such directory"):
        R.check_rewards([_spec("asr", {"model": str(tmp_path / "no_asr")})], ctx)
    (tmp_path / "text_lm").mkdir()
    (tmp_path / "text_lm" / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "model_type": "llama"}')
    with pytest.raises(ConfigError, match="not a speech recognition model"):
        R.check_rewards([_spec("asr", {"model": str(tmp_path / "text_lm")})], ctx)
    with pytest.raises(ConfigError, match=r"options\.metric: 'bleu' is not one of"):
        R.check_rewards([_spec("asr", {"model": str(tmp_path), "metric": "bleu"})], ctx)


# ---------------------------------------------------------------------------- config
def _base(tmp_path, **align):
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text("{}")
    (tmp_path / "p.jsonl").write_text('{"modality": "speech", "text": "hi"}\n')
    return {"run": {"dir": str(tmp_path / "run"), "max_steps": 4}, "model": {"name": str(model)},
            "optim": {"micro_batch_size": 4, "warmup_steps": 0},
            "align": {"prompts": {"file": str(tmp_path / "p.jsonl")}, "prompts_per_step": 2, "group_size": 4,
                      "rewards": [{"name": "code_frequency", "options": {"modality": "speech", "code": 1}}],
                      **align}}


@pytest.mark.parametrize("overrides, message", [
    (["align.group_size=1"], r"^align\.group_size: GRPO needs at least 2"),
    (["optim.micro_batch_size=3"], r"^optim\.micro_batch_size: 3 must divide the 8 sequences"),
    (["optim.grad_accum=3"], r"^optim\.grad_accum: derived from the step"),
    (["align.grpo.clip_eps=1.5"], r"^align\.grpo\.clip_eps"),
    (["align.method=dpo", "optim.micro_batch_size=1", "align.prompts_per_step=1"], r"^optim\.micro_batch_size: DPO"),
    (["align.method=dpo"], r"^align\.prompts\.shards: SpeechAlign-style DPO needs shards"),
    (["align.dpo.rounds=5"], r"^align\.dpo\.rounds: 5 rounds need at least"),
    (["align.rewards=[]"], r"^align\.rewards: GRPO needs at least one reward"),
    (["align.prompts.modalities=[smell]"], r"^align\.prompts\.modalities: \['smell'\]"),
    (["model.name=tiny"], r"^model\.name: 'tiny' is not a directory; alignment starts from an exported"),
    (["align.methd=grpo"], r"^align\.methd: unknown key"),
])
def test_config_errors_name_the_key(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_align_config(None, overrides, base=_base(tmp_path))


def test_config_derives_grad_accum_and_finds_the_exports_codecs(tmp_path):
    base = _base(tmp_path)
    (tmp_path / "model" / "codecs").mkdir()
    cfg = load_align_config(None, ["optim.micro_batch_size=2"], base=base)
    assert cfg.optim.grad_accum == 4 and cfg.sequences_per_update == 8
    assert cfg.model.codecs == str(tmp_path / "model" / "codecs")
    dpo = load_align_config(None, ["align.method=dpo", "align.dpo.pairs=" + str(tmp_path / "p.jsonl")], base=base)
    assert dpo.sequences_per_update == 4 and dpo.optim.grad_accum == 1


# ---------------------------------------------------------------------------- forward passes
def test_response_logprobs_match_a_full_forward(tiny_layout, tiny_tokenizer):
    from anygpt.align.rollout import make_batch, token_logprobs
    from anygpt.model import build_model

    model = build_model("tiny", tiny_layout, tiny_tokenizer, seed=0).eval()
    rng = np.random.default_rng(0)
    rows = [(rng.integers(5, 300, 6), rng.integers(5, 300, 3)), (rng.integers(5, 300, 4), rng.integers(5, 300, 5))]
    batch = make_batch(rows, pad_id=0, device=torch.device("cpu"))
    with torch.no_grad():
        logp, row_of = token_logprobs(model, model, batch)
        expected, expected_rows = [], []
        for i, (p, r) in enumerate(rows):
            seq = torch.from_numpy(np.concatenate([p, r]))[None]
            full = torch.log_softmax(model(input_ids=seq).logits[0].float(), -1)
            expected += [float(full[len(p) - 1 + j, int(t)]) for j, t in enumerate(r)]
            expected_rows += [i] * len(r)
    assert row_of.tolist() == expected_rows
    assert logp.tolist() == pytest.approx(expected, abs=1e-4)  # padded batch vs one row: float32 sums
