"""The one loader of a local speech recognition model: ``anygpt eval --asr-model DIR`` and the ``asr``
reward of ``anygpt align`` both go through :func:`load_asr`.

Why not ``transformers.pipeline("automatic-speech-recognition")``: the pipeline checks nothing until
the first clip, so a Whisper directory without its tokenizer files (or a text-only model directory)
failed only after every answer had been generated, with a cut-off message; it lets Whisper guess the
language of every clip (a tiny or noisy clip is then "transcribed" into another language); and it has
no teacher-forced score of a given text, which the alignment reward needs.  So:

- :func:`check_asr_dir` validates a directory *up front*, without loading weights: a Whisper
  (``WhisperForConditionalGeneration``) or CTC (``*ForCTC``: wav2vec 2.0, HuBERT, ...) model config,
  weights, a tokenizer with a vocabulary and a pad token, and a feature extractor.  Every problem is
  one :class:`ASRError` line naming the directory.
- :class:`ASRModel` transcribes batches of waveforms at any sample rate (resampled to the model's own)
  with Whisper's language and task fixed (``language="en"``, ``task="transcribe"`` by default; English-only
  Whisper checkpoints take neither), and gives :meth:`ASRModel.nll`, the model's mean per-token
  negative log-likelihood of a reference text given the audio (teacher-forced decoder for Whisper, the
  CTC loss per target character for CTC models).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from anygpt.eval.metrics import normalize_text
from anygpt.model import quiet_transformers

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                "pytorch_model.bin.index.json")


class ASRError(ValueError):
    """An unusable ASR model directory (the message names it and what is missing)."""


@dataclass(frozen=True)
class ASRSpec:
    """What :func:`check_asr_dir` found: the directory and the model family (``whisper`` | ``ctc``)."""

    path: Path
    kind: str
    architecture: str


def check_asr_dir(asr_model: str | Path, language: str | None = "en", task: str = "transcribe",
                  where: str = "--asr-model") -> ASRSpec:
    """Validate a local ASR model directory before any work; :class:`ASRError` (one line) otherwise.

    Args:
        asr_model: the directory (nothing is ever downloaded).
        language, task: what Whisper will be told; a multilingual Whisper must know both (its
            ``generation_config.json``), an English-only one takes none (both are then ignored, as
            for CTC models).
        where: how the caller names the setting in messages (``--asr-model``,
            ``align.rewards[0].options.model``).
    """
    from transformers import AutoFeatureExtractor, AutoTokenizer

    path = Path(asr_model)
    if not path.is_dir():
        raise ASRError(f"{where} {path}: no such directory (a local Whisper or wav2vec 2.0 CTC model directory)")
    cfg_file = path / "config.json"
    try:
        config = json.loads(cfg_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ASRError(f"{where} {path}: not a Hugging Face model directory (no config.json)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ASRError(f"{where} {cfg_file}: unreadable ({type(e).__name__})") from None
    archs = [str(a) for a in config.get("architectures") or []]
    if "WhisperForConditionalGeneration" in archs:
        kind, arch = "whisper", "WhisperForConditionalGeneration"
    elif any(a.endswith("ForCTC") for a in archs):
        kind, arch = "ctc", next(a for a in archs if a.endswith("ForCTC"))
    else:
        raise ASRError(f"{where} {path}: not a speech recognition model (architectures {archs or '?'}, model_type "
                       f"{config.get('model_type', '?')!r}); expected WhisperForConditionalGeneration or a *ForCTC "
                       f"model such as Wav2Vec2ForCTC")
    if not any((path / f).is_file() for f in WEIGHT_FILES):
        raise ASRError(f"{where} {path}: no weights ({' or '.join(WEIGHT_FILES[:2])})")
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises OSError/ValueError/TypeError/KeyError here
        raise ASRError(f"{where} {path}: no usable tokenizer files ({type(e).__name__}: "
                       f"{str(e).splitlines()[0][:120] if str(e) else ''})") from None
    # transformers builds a tokenizer even from a directory without vocabulary files (one token, from the
    # config's special ids): compare with what the model predicts.
    size, predicts = len(tok.get_vocab()), int(config.get("vocab_size") or 0)
    if size == 0 or size < predicts // 2:
        raise ASRError(f"{where} {path}: the tokenizer has {size} tokens but the model predicts {predicts}: "
                       f"tokenizer files missing (vocab.json, tokenizer.json or tokenizer_config.json)")
    if tok.pad_token_id is None:
        raise ASRError(f"{where} {path}: the tokenizer has no pad token (tokenizer_config.json / special_tokens_map.json)")
    try:
        fe = AutoFeatureExtractor.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # noqa: BLE001
        raise ASRError(f"{where} {path}: no feature extractor (preprocessor_config.json; {type(e).__name__})") from None
    if not getattr(fe, "sampling_rate", None):
        raise ASRError(f"{where} {path}: the feature extractor has no sampling_rate")
    if kind == "whisper":
        _check_whisper_language(path, language, task, where)
    return ASRSpec(path, kind, arch)


def _check_whisper_language(path: Path, language: str | None, task: str, where: str) -> None:
    """A multilingual Whisper must know ``language`` (code ``en`` or name ``english``) and ``task``."""
    try:
        gen = json.loads((path / "generation_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # no generation config: transformers' defaults decide (English-only behaviour)
    langs = gen.get("lang_to_id") or {}
    if not (gen.get("is_multilingual") or langs):
        return  # English-only checkpoint: no language or task token
    tasks = gen.get("task_to_id") or {}
    if tasks and task not in tasks:
        raise ASRError(f"{where} {path}: task {task!r} unknown to this Whisper (known: {', '.join(sorted(tasks))})")
    if language is None:
        return
    from transformers.models.whisper.tokenization_whisper import LANGUAGES, TO_LANGUAGE_CODE

    code = language.lower()
    code = TO_LANGUAGE_CODE.get(code, code)
    if code not in LANGUAGES or (langs and f"<|{code}|>" not in langs):
        raise ASRError(f"{where} {path}: language {language!r} unknown to this Whisper (e.g. en, english, de)")


class ASRModel:
    """A loaded ASR model: :meth:`transcribe` and :meth:`nll` on batches of waveforms.

    Args:
        spec: a checked directory (:func:`check_asr_dir`).
        device: where the model runs.
        language: Whisper's language (ignored by CTC models and English-only Whispers).
        task: Whisper's task (``transcribe``).
        max_new_tokens: Whisper's transcript budget per clip.
    """

    def __init__(self, spec: ASRSpec, device: torch.device | str = "cpu", language: str | None = "en",
                 task: str = "transcribe", max_new_tokens: int = 128):
        from transformers import AutoFeatureExtractor, AutoModelForCTC, AutoTokenizer, WhisperForConditionalGeneration

        self.spec, self.kind = spec, spec.kind
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(str(spec.path), local_files_only=True)
        self.feature_extractor = AutoFeatureExtractor.from_pretrained(str(spec.path), local_files_only=True)
        self.sampling_rate = int(self.feature_extractor.sampling_rate)
        cls = WhisperForConditionalGeneration if spec.kind == "whisper" else AutoModelForCTC
        try:
            with quiet_transformers():
                self.model = cls.from_pretrained(str(spec.path), local_files_only=True).to(self.device).eval()
        except (OSError, ValueError, RuntimeError) as e:
            raise ASRError(f"{spec.path}: cannot load the ASR model ({str(e).splitlines()[0][:160]})") from None
        self.max_new_tokens = max_new_tokens
        self.generate_kwargs: dict[str, Any] = {}
        if spec.kind == "whisper":
            gen = self.model.generation_config
            # English-only checkpoints (whisper-*.en) refuse a language/task; multilingual ones get both
            # fixed, instead of a language guessed per clip.
            if getattr(gen, "is_multilingual", False) or getattr(gen, "lang_to_id", None):
                self.generate_kwargs = {"language": language, "task": task} if language else {"task": task}
                self.tokenizer.set_prefix_tokens(language=language, task=task, predict_timestamps=False)
            else:
                self.tokenizer.set_prefix_tokens(predict_timestamps=False)
        else:
            vocab = [t for t in self.tokenizer.get_vocab() if t.isalpha()]
            # CTC vocabularies are usually upper-case letters (wav2vec 2.0's LibriSpeech heads).
            self.upper = sum(t.isupper() for t in vocab) > sum(t.islower() for t in vocab)

    # ------------------------------------------------------------------ inputs
    def _resample(self, waves: Sequence[np.ndarray], sample_rate: int) -> list[np.ndarray]:
        import soxr

        out = []
        for w in waves:
            w = np.asarray(w, dtype=np.float32).reshape(-1)
            if sample_rate != self.sampling_rate:
                w = soxr.resample(w, sample_rate, self.sampling_rate).astype(np.float32)
            out.append(w if w.size else np.zeros(self.sampling_rate // 10, dtype=np.float32))
        return out

    def _features(self, waves: list[np.ndarray]) -> dict[str, torch.Tensor]:
        if self.kind == "whisper":
            feats = self.feature_extractor(waves, sampling_rate=self.sampling_rate, return_tensors="pt")
            return {"input_features": feats["input_features"].to(self.device, self.model.dtype)}
        feats = self.feature_extractor(waves, sampling_rate=self.sampling_rate, return_tensors="pt", padding=True,
                                       return_attention_mask=True)
        out = {"input_values": feats["input_values"].to(self.device, self.model.dtype)}
        if "attention_mask" in feats:
            out["attention_mask"] = feats["attention_mask"].to(self.device)
        return out

    def ctc_text(self, text: str) -> str:
        """A reference text as a CTC vocabulary spells it (normalised, upper-cased for upper-case heads)."""
        t = normalize_text(text)
        return t.upper() if self.upper else t

    # ------------------------------------------------------------------ scoring
    @torch.inference_mode()
    def transcribe(self, waves: Sequence[np.ndarray], sample_rate: int, batch_size: int = 8) -> list[str]:
        """Transcripts of waveforms sampled at ``sample_rate`` (resampled to the model's rate)."""
        waves = self._resample(waves, sample_rate)
        out: list[str] = []
        for i in range(0, len(waves), batch_size):
            inputs = self._features(waves[i: i + batch_size])
            if self.kind == "whisper":
                # The decoder's context (448 for released Whispers) holds the forced prefix too.
                room = int(getattr(self.model.config, "max_target_positions", 448)) - len(self.tokenizer.prefix_tokens) - 1
                # Quiet: transformers warns on every call about settings we set on purpose (the budget
                # beside the checkpoint's max_length, no attention mask for Whisper's fixed 30 s features).
                with quiet_transformers():
                    ids = self.model.generate(**inputs, max_new_tokens=max(1, min(self.max_new_tokens, room)),
                                              **self.generate_kwargs)
                out += [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]
            else:
                ids = self.model(**inputs).logits.argmax(-1)
                out += [t.strip() for t in self.tokenizer.batch_decode(ids)]
        return out

    @torch.inference_mode()
    def nll(self, waves: Sequence[np.ndarray], sample_rate: int, texts: Sequence[str],
            batch_size: int = 8) -> list[float]:
        """Mean per-token negative log-likelihood of each ``texts[i]`` given ``waves[i]`` (nats).

        Whisper: teacher-forced decoder over the text's tokens and end-of-text, after the forced
        start/language/task/no-timestamps prefix (which is not scored).  CTC: the CTC loss of the
        normalised text divided by its length in labels.
        """
        if len(waves) != len(texts):
            raise ValueError(f"nll: {len(waves)} waveforms but {len(texts)} texts")
        waves = self._resample(waves, sample_rate)
        out: list[float] = []
        for i in range(0, len(waves), batch_size):
            inputs = self._features(waves[i: i + batch_size])
            chunk = list(texts[i: i + batch_size])
            out += self._whisper_nll(inputs, chunk) if self.kind == "whisper" else self._ctc_nll(inputs, chunk)
        return out

    def _whisper_nll(self, inputs: dict[str, torch.Tensor], texts: list[str]) -> list[float]:
        prefix = len(self.tokenizer.prefix_tokens)
        rows = [self.tokenizer(" " + t.strip()).input_ids for t in texts]  # prefix + text + <|endoftext|>
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        for j, r in enumerate(rows):
            ids[j, : len(r)] = torch.tensor(r)
        ids = ids.to(self.device)
        logits = self.model(**inputs, decoder_input_ids=ids[:, :-1]).logits.float()
        ce = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # [B, width - 1]
        scored = torch.zeros_like(ce, dtype=torch.bool)
        for j, r in enumerate(rows):
            scored[j, prefix - 1: len(r) - 1] = True  # predictions of text tokens and the end token
        return ((ce * scored).sum(1) / scored.sum(1).clamp(min=1)).tolist()

    def _ctc_nll(self, inputs: dict[str, torch.Tensor], texts: list[str]) -> list[float]:
        logits = self.model(**inputs).logits.float()
        log_probs = logits.log_softmax(-1).transpose(0, 1)  # [T, B, C]
        if "attention_mask" in inputs:
            lengths = self.model._get_feat_extract_output_lengths(inputs["attention_mask"].sum(-1)).long()
        else:
            lengths = torch.full((logits.shape[0],), logits.shape[1], dtype=torch.long)
        labels = [self.tokenizer(self.ctc_text(t)).input_ids or [self.tokenizer.pad_token_id] for t in texts]
        target_lengths = torch.tensor([len(lab) for lab in labels])
        targets = torch.tensor([i for lab in labels for i in lab], dtype=torch.long)
        blank = self.model.config.pad_token_id if self.model.config.pad_token_id is not None else \
            self.tokenizer.pad_token_id
        loss = F.ctc_loss(log_probs, targets, lengths.clamp(max=logits.shape[1]).cpu(), target_lengths, blank=blank,
                          reduction="none", zero_infinity=True)
        return (loss / target_lengths.clamp(min=1)).tolist()


def load_asr(asr_model: str | Path | ASRSpec, device: torch.device | str = "cpu", language: str | None = "en",
             task: str = "transcribe", where: str = "--asr-model") -> ASRModel:
    """Check and load a local ASR model directory (:func:`check_asr_dir`, then :class:`ASRModel`)."""
    spec = asr_model if isinstance(asr_model, ASRSpec) else check_asr_dir(asr_model, language, task, where)
    return ASRModel(spec, device, language=language, task=task)


def transcribe(asr: ASRModel, waves: Sequence[np.ndarray], sample_rate: int) -> list[str]:
    """Transcribe waveforms at ``sample_rate`` with a loaded model (resampled to its rate)."""
    return asr.transcribe(waves, sample_rate)


__all__ = ["ASRError", "ASRSpec", "ASRModel", "check_asr_dir", "load_asr", "transcribe"]
