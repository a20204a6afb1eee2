"""Rewards: a registry of scorers of text->X answers, composed with weights, plus guards against hacks.

A reward scores :class:`Sample` objects (what the prompt asked for, the codes the policy answered)
and returns, per sample, its value and named parts (``{"value": 0.8, "cer": 0.1, "nll": 0.7}``).
``align.rewards`` composes several with weights (:class:`CompositeReward`); every part goes into
``metrics.jsonl`` as ``reward_parts["<name>/<part>"]``.  Built in:

- ``asr``: the span is completed by its plugin (speech: SoundStorm fills RVQ layers 2-8), decoded by
  the codec, resampled to the ASR model's rate and transcribed by a local Whisper or CTC model
  (:mod:`anygpt.eval.asr`, the loader ``anygpt eval --asr-model`` uses); parts ``cer`` / ``wer``
  (jiwer, both sides through :func:`anygpt.eval.metrics.normalize_text`) and ``nll`` (the ASR model's
  teacher-forced NLL of the asked-for text, mean per token); value ``cer_nll`` (default): the weighted
  harmonic mean of ``U_CER = 1 - tanh(beta_c CER)`` and ``U_NLL = exp(-NLL / tau_n)`` with weights
  ``lambda_c`` / ``lambda_n`` (0.6 / 0.4, beta_c 3, tau_n 3, as the Llasa GRPO recipe), or ``cer`` /
  ``wer`` alone (``1 - tanh(beta_c x)``), or ``nll`` alone (``U_NLL``);
- ``judge``: the synthetic demo task's text->X judge (attributes of the nearest reference rendering,
  :class:`anygpt.demo.evaluate.AttributeJudge`): an alignment that needs no ASR model; option
  ``temperature`` > 0 scores the expected hits under a softmax over the references (dense);
- ``code_frequency``: the share of one code in the span (a deterministic reward for tests and smoke
  runs: "more of code X").

Guards (``align.guards``) run before the rewards: an answer that is cut off or malformed, that speaks
faster or slower than a band of seconds per character of its text, or that repeats one code longer
than ``max_repeat_seconds`` gets the ``floor`` reward, and the failure is counted by reason (models
learn to speak faster or truncate to game a WER reward).

A reward that fails for a sample (NaN, or an exception for its batch) makes that sample's reward NaN:
the trainer counts it and skips the sample's group; the run goes on.  A reward's options are checked
by its ``check`` before any rank starts (a missing ASR directory is one line).

A new reward: a function ``build(options, context) -> Reward`` decorated with
``@register_reward("name", check=...)`` in a module imported before the run (``ANYGPT_PLUGINS`` works:
plugins load with the modality registry).
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from anygpt import modalities as registry
from anygpt.config import ConfigError
from anygpt.eval.metrics import normalize_text
from anygpt.formats import Media
from anygpt.layout import VocabLayout

__all__ = ["Sample", "Reward", "RewardContext", "register_reward", "REWARDS", "check_rewards", "build_rewards",
           "CompositeReward", "guard_failure", "cer_nll_utility"]


@dataclass
class Sample:
    """One text->X answer to score.

    Attributes:
        modality: the modality the prompt asked for.
        text: the caption / words the prompt asked to be rendered.
        codes: the LM's codes ``[K, T]`` of the answer's span (None when the answer has none).
        stop: why generation ended (``eom``, ``budget`` ...).
        issues: malformed pieces the parser found.
    """

    modality: str
    text: str
    codes: np.ndarray | None
    stop: str = "eom"
    issues: int = 0


class Reward:
    """A scorer: ``score(samples) -> [{"value": float, part: float, ...}]`` for the modalities it takes."""

    name: str = "reward"
    modalities: tuple[str, ...] | None = None  # None: every modality

    def applies(self, modality: str) -> bool:
        return self.modalities is None or modality in self.modalities

    def score(self, samples: Sequence[Sample]) -> list[dict[str, float]]:
        raise NotImplementedError


@dataclass
class RewardContext:
    """What a reward may need: the model's layout and directory, its codecs, the device, a seed."""

    layout: VocabLayout | None
    model_dir: Path
    codecs: str | None
    device: Any = "cpu"
    seed: int = 0


@dataclass(frozen=True)
class RewardType:
    name: str
    build: Callable[[dict, RewardContext], Reward]
    check: Callable[[dict, str, RewardContext], None] | None
    doc: str = ""


REWARDS: dict[str, RewardType] = {}


def register_reward(name: str, check: Callable[[dict, str, RewardContext], None] | None = None):
    """Decorator: register ``build(options, context) -> Reward`` under ``name`` (``check(options, where,
    context)`` validates options before any rank starts and raises :class:`ConfigError` naming ``where``)."""
    def deco(build: Callable[[dict, RewardContext], Reward]) -> Callable[[dict, RewardContext], Reward]:
        REWARDS[name] = RewardType(name, build, check, ((build.__doc__ or "").strip().splitlines() or [""])[0])
        return build
    return deco


def options(given: Mapping[str, Any], schema: Mapping[str, tuple[type, Any]], where: str) -> dict[str, Any]:
    """``given`` checked against ``{key: (type, default)}`` (``default=...`` means required)."""
    unknown = [k for k in given if k not in schema]
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown option (known: {', '.join(schema)})")
    out = {}
    for key, (tp, default) in schema.items():
        if key not in given:
            if default is ...:
                raise ConfigError(f"{where}.{key}: required option missing")
            out[key] = default
            continue
        value = given[key]
        if tp is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if (value is not None and not isinstance(value, tp)) or (isinstance(value, bool) and tp is not bool):
            raise ConfigError(f"{where}.{key}: expected {tp.__name__}, got {value!r}")
        out[key] = value
    return out


# ---------------------------------------------------------------------------- guards
def _longest_run(row: np.ndarray) -> int:
    if row.size == 0:
        return 0
    change = np.flatnonzero(np.diff(row) != 0)
    bounds = np.concatenate([[-1], change, [row.size - 1]])
    return int(np.diff(bounds).max())


def guard_failure(sample: Sample, guards: Any, layout: VocabLayout) -> str | None:
    """The first guard ``sample`` fails (``not_ended``, ``no_span``, ``malformed``, ``too_fast``,
    ``too_slow``, ``repetition``), or None.  ``guards`` is an :class:`~anygpt.align.config.GuardConfig`."""
    if guards.require_end and sample.stop != "eom":
        return "not_ended"
    if sample.codes is None or np.asarray(sample.codes).size == 0:
        return "no_span"
    if sample.issues:
        return "malformed"
    spec = layout.modality(sample.modality)
    if spec.span_length is not None:
        return None  # fixed-length spans (images): no duration, repeats are content
    card = registry.codec_card(sample.modality, spec.codec) if sample.modality in registry.names() else None
    rate = float((card or {}).get("frame_rate") or 0)
    if rate <= 0:
        return None
    codes = np.asarray(sample.codes)
    seconds = codes.shape[-1] / rate
    plugin = registry.get(sample.modality)
    chars = len(normalize_text(sample.text).replace(" ", ""))
    if plugin.text_kind == "transcript" and chars:
        per_char = seconds / chars
        if per_char < guards.min_seconds_per_char:
            return "too_fast"
        if per_char > guards.max_seconds_per_char:
            return "too_slow"
    if max(_longest_run(row) for row in codes.reshape(-1, codes.shape[-1])) / rate > guards.max_repeat_seconds:
        return "repetition"
    return None


# ---------------------------------------------------------------------------- composite
class CompositeReward:
    """``align.rewards`` with their weights, behind ``align.guards``.

    ``__call__(samples)`` returns one dict per sample: ``reward`` (the weighted sum of the rewards
    that apply to its modality; ``floor`` when a guard failed; NaN when a reward failed), ``parts``
    (``"<name>"`` and ``"<name>/<part>"`` values) and ``guard`` (the failed guard or None).
    """

    def __init__(self, terms: list[tuple[str, float, Reward]], guards: Any, layout: VocabLayout):
        self.terms, self.guards, self.layout = terms, guards, layout

    def check_modalities(self, modalities: Sequence[str]) -> None:
        missing = [m for m in modalities if not any(r.applies(m) for _, _, r in self.terms)]
        if missing:
            raise ConfigError(f"align.rewards: no reward scores {', '.join(missing)} answers (the prompts ask "
                              f"for them); add one or narrow align.prompts.modalities")

    def __call__(self, samples: Sequence[Sample]) -> list[dict[str, Any]]:
        out = [{"reward": 0.0, "parts": {}, "guard": None} for _ in samples]
        live = []
        for i, s in enumerate(samples):
            reason = guard_failure(s, self.guards, self.layout) if self.guards.enabled else None
            if reason is not None:
                out[i].update(reward=float(self.guards.floor), guard=reason)
            else:
                live.append(i)
        for name, weight, reward in self.terms:
            idx = [i for i in live if reward.applies(samples[i].modality)]
            if not idx:
                continue
            try:
                scores = reward.score([samples[i] for i in idx])
                if len(scores) != len(idx):
                    raise RuntimeError(f"returned {len(scores)} scores for {len(idx)} samples")
            except Exception as e:  # noqa: BLE001 - one failing reward must not stop the run: counted, skipped
                print(f"warning: reward {name} failed on {len(idx)} samples: "
                      f"{(str(e).splitlines() or [type(e).__name__])[0]}", file=sys.stderr, flush=True)
                scores = [{"value": float("nan")} for _ in idx]
            for i, sc in zip(idx, scores):
                value = float(sc.get("value", float("nan")))
                out[i]["reward"] += weight * value
                out[i]["parts"][name] = value
                for k, v in sc.items():
                    if k != "value":
                        out[i]["parts"][f"{name}/{k}"] = float(v)
        return out


def check_rewards(specs: Sequence[Any], context: RewardContext) -> None:
    """Every ``align.rewards[i]`` names a registered reward with valid options (no model loaded)."""
    for i, spec in enumerate(specs):
        where = f"align.rewards[{i}]"
        if spec.name not in REWARDS:
            raise ConfigError(f"{where}.name: unknown reward {spec.name!r} (registered: {', '.join(REWARDS)})")
        rt = REWARDS[spec.name]
        if rt.check is not None:
            rt.check(dict(spec.options), f"{where}.options", context)


def build_rewards(specs: Sequence[Any], guards: Any, context: RewardContext) -> CompositeReward:
    """Build the composite reward of ``align.rewards`` (each reward loads its models here)."""
    check_rewards(specs, context)
    terms = []
    for spec in specs:
        reward = REWARDS[spec.name].build(dict(spec.options), context)
        reward.name = spec.name
        terms.append((spec.name, float(spec.weight), reward))
    return CompositeReward(terms, guards, context.layout)


# ---------------------------------------------------------------------------- code_frequency
_CODE_FREQUENCY = {"modality": (str, ...), "code": (int, None), "codes": (list, None), "codebook": (int, 0)}


def _check_code_frequency(opts: dict, where: str, context: RewardContext) -> None:
    o = options(opts, _CODE_FREQUENCY, where)
    if o["modality"] not in registry.names():
        raise ConfigError(f"{where}.modality: {o['modality']!r} is not a registered modality")
    if (o["code"] is None) == (o["codes"] is None):
        raise ConfigError(f"{where}: give exactly one of code (one code) and codes (a list of codes)")


class CodeFrequency(Reward):
    def __init__(self, modality: str, codes: Sequence[int], codebook: int):
        self.modalities, self.codes, self.codebook = (modality,), np.asarray(sorted(codes), dtype=np.int64), codebook

    def score(self, samples: Sequence[Sample]) -> list[dict[str, float]]:
        out = []
        for s in samples:
            row = np.asarray(s.codes)[self.codebook] if s.codes is not None and np.asarray(s.codes).size else np.zeros(0)
            out.append({"value": float(np.isin(row, self.codes).mean()) if row.size else 0.0})
        return out


@register_reward("code_frequency", check=_check_code_frequency)
def build_code_frequency(opts: dict, context: RewardContext) -> Reward:
    """The share of ``code`` (or of ``codes``) among the span's codes: a deterministic test reward."""
    o = options(opts, _CODE_FREQUENCY, "code_frequency")
    return CodeFrequency(o["modality"], [o["code"]] if o["code"] is not None else [int(c) for c in o["codes"]],
                         o["codebook"])


# ---------------------------------------------------------------------------- judge
_JUDGE = {"demo": (str, ...), "max_train": (int, 400), "temperature": (float, 0.0)}


def _check_judge(opts: dict, where: str, context: RewardContext) -> None:
    o = options(opts, _JUDGE, where)
    demo = Path(o["demo"])
    if not (demo / "shards").is_dir():
        raise ConfigError(f"{where}.demo: {demo} is not an `anygpt demo` output directory (no shards/)")


@register_reward("judge", check=_check_judge)
def build_judge(opts: dict, context: RewardContext) -> Reward:
    """The demo's text->X judge: the fraction of asked-for attributes the nearest reference has."""
    # The judge needs the demo's references, so this builder (only) imports the demo; eval never does.
    from anygpt.demo.evaluate import AttributeJudge

    o = options(opts, _JUDGE, "judge")
    demo = Path(o["demo"])
    codecs_dir = Path(context.codecs) if context.codecs else demo / "codecs"
    judge = AttributeJudge(context.layout, registry.load_codecs(codecs_dir), demo / "shards", max_train=o["max_train"])

    class Judge(Reward):
        modalities = judge.modalities

        def score(self, samples: Sequence[Sample]) -> list[dict[str, float]]:
            out: list[dict[str, float]] = [{} for _ in samples]
            for m in {s.modality for s in samples}:
                idx = [i for i, s in enumerate(samples) if s.modality == m]
                for i, v in zip(idx, judge.score(m, [samples[i].text for i in idx], [samples[i].codes for i in idx],
                                                   o["temperature"])):
                    out[i] = {"value": v}
            return out

    return Judge()


# ---------------------------------------------------------------------------- asr
_ASR = {"model": (str, ...), "language": (str, "en"), "task": (str, "transcribe"), "metric": (str, "cer_nll"),
        "lambda_c": (float, 0.6), "lambda_n": (float, 0.4), "beta_c": (float, 3.0), "tau_n": (float, 3.0),
        "soundstorm": (str, None), "modalities": (list, None), "batch_size": (int, 8)}
_METRICS = ("cer_nll", "cer", "wer", "nll")


def cer_nll_utility(cer: float, nll: float, lambda_c: float = 0.6, lambda_n: float = 0.4, beta_c: float = 3.0,
                    tau_n: float = 3.0) -> tuple[float, float, float]:
    """``(value, U_CER, U_NLL)``: the weighted harmonic mean of ``U_CER = 1 - tanh(beta_c CER)`` and
    ``U_NLL = exp(-NLL / tau_n)`` (0 when either utility is 0)."""
    u_c = 1.0 - math.tanh(beta_c * cer)
    u_n = math.exp(-nll / tau_n)
    if u_c <= 0 or u_n <= 0:
        return 0.0, u_c, u_n
    return (lambda_c + lambda_n) / (lambda_c / u_c + lambda_n / u_n), u_c, u_n


def _asr_modalities(layout: VocabLayout | None, wanted: list | None) -> tuple[str, ...]:
    """Modalities the ASR reward scores: ``wanted``, else those whose text is a transcript."""
    names = list(layout.modalities) if layout is not None else list(registry.names())
    if wanted is not None:
        return tuple(str(m) for m in wanted)
    return tuple(m for m in names if registry.get(m).text_kind == "transcript")


def _soundstorm_source(o: dict, context: RewardContext) -> Any:
    """``options.soundstorm`` (a directory, ``tiny`` or ``none``), else ``MODEL/soundstorm`` when present."""
    from anygpt.infer.mediaio import resolve_soundstorm

    codecs = context.codecs if context.codecs == "tiny" else (Path(context.codecs) if context.codecs else None)
    return resolve_soundstorm(o["soundstorm"], context.model_dir, codecs)


def _check_asr(opts: dict, where: str, context: RewardContext) -> None:
    from anygpt.eval.asr import check_asr_dir

    o = options(opts, _ASR, where)
    if o["metric"] not in _METRICS:
        raise ConfigError(f"{where}.metric: {o['metric']!r} is not one of {list(_METRICS)}")
    for key in ("lambda_c", "lambda_n", "beta_c", "tau_n"):
        if o[key] < 0 or (key == "tau_n" and o[key] == 0):
            raise ConfigError(f"{where}.{key}: must be {'> 0' if key == 'tau_n' else '>= 0'}, got {o[key]}")
    try:
        check_asr_dir(o["model"], o["language"], o["task"], where=f"{where}.model")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    mods = _asr_modalities(context.layout, o["modalities"])
    if not mods:
        raise ConfigError(f"{where}.modalities: the model has no modality whose text is a transcript")
    if context.codecs is None:
        raise ConfigError(f"{where}: needs the model's codecs to render audio (model.codecs, or MODEL/codecs)")
    try:
        _soundstorm_source(o, context)
    except ValueError as e:
        raise ConfigError(f"{where}.soundstorm: {e}") from None


class AsrReward(Reward):
    """Speech answers -> audio -> ASR -> CER/WER and NLL of the asked-for text (see the module docstring)."""

    def __init__(self, o: dict, context: RewardContext):
        from anygpt.eval.asr import load_asr
        from anygpt.infer.mediaio import MediaIO

        self.o = o
        self.modalities = _asr_modalities(context.layout, o["modalities"])
        self.asr = load_asr(o["model"], context.device, o["language"], o["task"], where="asr reward model")
        codecs = context.codecs if context.codecs == "tiny" else Path(context.codecs)
        self.media = MediaIO(context.layout, codecs, _soundstorm_source(o, context), context.device, seed=context.seed)
        # Loaded now, not on first use: the trainer builds rewards before the ZeRO-3 engine exists (under it
        # transformers would partition these models).
        for m in self.modalities:
            self.media.codec(m)
        self.media.soundstorm()

    def score(self, samples: Sequence[Sample]) -> list[dict[str, float]]:
        import jiwer

        waves, rates = [], set()
        for s in samples:
            wave = self.media.decode(Media(s.modality, np.asarray(s.codes, dtype=np.int64)))
            waves.append(np.asarray(wave, dtype=np.float32).reshape(-1))
            rates.add(int(self.media.codec(s.modality).sample_rate))
        if len(rates) != 1:
            raise RuntimeError(f"answers at several sample rates {sorted(rates)}")
        rate = rates.pop()
        hyps = self.asr.transcribe(waves, rate, self.o["batch_size"])
        texts = [s.text for s in samples]
        nlls = self.asr.nll(waves, rate, texts, self.o["batch_size"])
        o = self.o
        out = []
        for hyp, ref, nll in zip(hyps, texts, nlls):
            r, h = normalize_text(ref), normalize_text(hyp)
            cer = float(jiwer.cer(r, h)) if r else float("nan")
            wer = float(jiwer.wer(r, h)) if r else float("nan")
            combined, u_c, u_n = cer_nll_utility(cer, nll, o["lambda_c"], o["lambda_n"], o["beta_c"], o["tau_n"])
            value = {"cer_nll": combined, "cer": 1.0 - math.tanh(o["beta_c"] * cer),
                     "wer": 1.0 - math.tanh(o["beta_c"] * wer), "nll": u_n}[o["metric"]]
            out.append({"value": value, "cer": cer, "wer": wer, "nll": float(nll), "u_cer": u_c, "u_nll": u_n})
        return out


@register_reward("asr", check=_check_asr)
def build_asr(opts: dict, context: RewardContext) -> Reward:
    """Intelligibility of generated speech by a local ASR model (Whisper or CTC): CER/WER and NLL."""
    return AsrReward(options(opts, _ASR, "asr"), context)


def reward_table() -> list[tuple[str, str]]:
    """(name, one-line description) of every registered reward."""
    return [(name, rt.doc or "") for name, rt in REWARDS.items()]
