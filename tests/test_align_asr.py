"""The `asr` reward end to end on tiny random models saved like real ones (a Whisper and a wav2vec 2.0
CTC model): speech codes -> SoundStorm (layers 2-8) -> codec decoder -> 16 kHz audio -> ASR -> CER / WER
against the asked-for text and the ASR's teacher-forced NLL of that text, combined by the Llasa formula;
and the one ASR loader's up-front checks."""
from __future__ import annotations

import json
import math
import shutil

import jiwer
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from anygpt.align.config import GuardConfig, RewardSpec
from anygpt.align.rewards import RewardContext, Sample, build_rewards, cer_nll_utility
from anygpt.align.testing import tiny_ctc_dir, tiny_whisper_dir
from anygpt.eval.asr import ASRError, check_asr_dir
from anygpt.eval.metrics import normalize_text
from anygpt.formats import Media

TEXTS = ["Hello, world!", "the cat sits on a warm mat", "a red bus"]


@pytest.fixture(scope="module")
def asr_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("asr")
    return {"whisper": tiny_whisper_dir(root / "whisper"), "ctc": tiny_ctc_dir(root / "ctc")}


def _samples(n_frames=(60, 80, 40)):
    rng = np.random.default_rng(0)
    return [Sample("speech", t, rng.integers(0, 1024, (1, f))) for t, f in zip(TEXTS, n_frames)]


def _reward(kind, asr_dirs, tiny_layout, tmp_path, **options):
    spec = RewardSpec("asr", options={"model": str(asr_dirs[kind]), "soundstorm": "tiny", **options})
    return build_rewards([spec], GuardConfig(enabled=False), RewardContext(tiny_layout, tmp_path, "tiny"))


@pytest.mark.parametrize("kind", ["whisper", "ctc"])
def test_asr_reward_scores_rendered_speech(kind, asr_dirs, tiny_layout, tmp_path):
    composite = _reward(kind, asr_dirs, tiny_layout, tmp_path)
    asr_reward = composite.terms[0][2]
    samples = _samples()
    out = composite(samples + [Sample("image", "a red circle", np.zeros((1, 32), dtype=np.int64))])
    assert "asr" not in out[-1]["parts"]  # images are not transcripts: the asr reward does not score them

    # The same pipeline by hand: SoundStorm + codec decoder -> audio at the codec's rate -> the ASR model.
    media, asr = asr_reward.media, asr_reward.asr
    rate = media.codec("speech").sample_rate
    waves = [np.asarray(media.decode(Media("speech", s.codes)), dtype=np.float32).reshape(-1) for s in samples]
    assert all(w.size >= s.codes.shape[-1] * rate // 50 for w, s in zip(waves, samples))  # 50 Hz frames -> audio
    hyps = asr.transcribe(waves, rate)
    nlls = asr.nll(waves, rate, [s.text for s in samples])
    for s, o, hyp, nll in zip(samples, out, hyps, nlls):
        p = o["parts"]
        assert p["asr/cer"] == pytest.approx(jiwer.cer(normalize_text(s.text), normalize_text(hyp)))
        assert p["asr/wer"] == pytest.approx(jiwer.wer(normalize_text(s.text), normalize_text(hyp)))
        assert p["asr/nll"] == pytest.approx(nll, rel=1e-5) and nll > 0
        value, u_c, u_n = cer_nll_utility(p["asr/cer"], p["asr/nll"])
        assert p["asr"] == pytest.approx(value) and o["reward"] == pytest.approx(value)
        assert p["asr/u_cer"] == pytest.approx(u_c) and p["asr/u_nll"] == pytest.approx(u_n)
        assert 0.0 <= value <= 1.0
    # The NLL is of the asked-for text: another text on the same audio scores differently.
    assert asr.nll(waves[:1], rate, ["something else entirely"])[0] != pytest.approx(nlls[0])
    # metric: cer alone is 1 - tanh(beta_c CER)
    only_cer = _reward(kind, asr_dirs, tiny_layout, tmp_path, metric="cer", beta_c=2.0)(samples[:1])[0]
    assert only_cer["reward"] == pytest.approx(1 - math.tanh(2.0 * only_cer["parts"]["asr/cer"]))


def test_whisper_nll_is_the_teacher_forced_loss_of_the_text_tokens(asr_dirs):
    from anygpt.eval.asr import load_asr

    asr = load_asr(asr_dirs["whisper"], language="de")
    de = asr.tokenizer.convert_tokens_to_ids("<|de|>")
    assert de in asr.tokenizer.prefix_tokens and asr.generate_kwargs["language"] == "de"  # told, not guessed
    wave = np.random.default_rng(1).normal(0, 0.1, 16000).astype(np.float32)
    text = "a red bus"
    ids = asr.tokenizer(" " + text).input_ids  # <|startoftranscript|> <|de|> <|transcribe|> <|notimestamps|> ... <|endoftext|>
    prefix = len(asr.tokenizer.prefix_tokens)
    assert ids[:prefix] == asr.tokenizer.prefix_tokens and ids[-1] == asr.tokenizer.eos_token_id
    feats = asr.feature_extractor([wave], sampling_rate=16000, return_tensors="pt").input_features
    labels = torch.tensor([ids[1:]])
    labels[0, : prefix - 1] = -100  # the forced language/task tokens are not scored
    with torch.no_grad():  # teacher forcing: the decoder reads the true ids, each predicting the next
        expected = asr.model(input_features=feats, decoder_input_ids=torch.tensor([ids[:-1]]), labels=labels).loss
    assert asr.nll([wave], 16000, [text])[0] == pytest.approx(float(expected), rel=1e-5)


def test_ctc_nll_is_the_ctc_loss_per_label(asr_dirs):
    from anygpt.eval.asr import load_asr

    asr = load_asr(asr_dirs["ctc"])
    wave = np.random.default_rng(2).normal(0, 0.1, 16000).astype(np.float32)
    labels = asr.tokenizer(asr.ctc_text("A red bus!")).input_ids
    assert asr.tokenizer.decode(labels) == "A RED BUS"  # normalised, upper-cased for an upper-case head
    values = asr.feature_extractor([wave], sampling_rate=16000, return_tensors="pt").input_values
    with torch.no_grad():
        log_probs = asr.model(input_values=values).logits.float().log_softmax(-1).transpose(0, 1)
    expected = F.ctc_loss(log_probs, torch.tensor([labels]), torch.tensor([log_probs.shape[0]]),
                          torch.tensor([len(labels)]), blank=0, reduction="sum") / len(labels)
    assert asr.nll([wave], 16000, ["A red bus!"])[0] == pytest.approx(float(expected), rel=1e-4)


def test_asr_dir_problems_are_one_line_up_front(asr_dirs, tmp_path):
    where = "align.rewards[0].options.model"
    cases = []
    no_tok = tmp_path / "no_tokenizer"
    shutil.copytree(asr_dirs["whisper"], no_tok)
    for f in ("tokenizer_config.json", "vocab.json", "merges.txt", "tokenizer.json", "special_tokens_map.json",
              "added_tokens.json"):
        (no_tok / f).unlink(missing_ok=True)
    cases.append((no_tok, {}, "tokenizer files missing"))
    no_fe = tmp_path / "no_feature_extractor"
    shutil.copytree(asr_dirs["ctc"], no_fe)
    (no_fe / "preprocessor_config.json").unlink()
    cases.append((no_fe, {}, "no feature extractor"))
    text_lm = tmp_path / "text_lm"
    text_lm.mkdir()
    (text_lm / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    cases.append((text_lm, {}, "not a speech recognition model"))
    no_weights = tmp_path / "no_weights"
    shutil.copytree(asr_dirs["ctc"], no_weights)
    (no_weights / "model.safetensors").unlink()
    cases.append((no_weights, {}, "no weights"))
    cases.append((asr_dirs["whisper"], {"language": "klingon"}, "language 'klingon' unknown to this Whisper"))
    cases.append((asr_dirs["whisper"], {"task": "summarise"}, "task 'summarise' unknown"))
    for path, kw, message in cases:
        with pytest.raises(ASRError) as e:
            check_asr_dir(path, where=where, **kw)
        line = str(e.value)
        assert "\n" not in line and line.startswith(f"{where} {path}") and message in line, line
    assert check_asr_dir(asr_dirs["whisper"], "english").kind == "whisper"
    assert check_asr_dir(asr_dirs["ctc"], "klingon").kind == "ctc"  # CTC models take no language
