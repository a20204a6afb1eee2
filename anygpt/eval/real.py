"""Real-data harness of ``anygpt eval --generate``: the model answers held-out shard samples.

For every held-out ``(text, media)`` pair in the shards (the ``data_pipeline`` schema), up to
``items`` per modality:

- ``asr``: speech -> text, greedy; corpus WER (jiwer, :func:`~anygpt.eval.synthetic.normalize_text`
  on both sides) against the sample's transcript;
- ``caption``: image -> text and music -> text, greedy; corpus BLEU-1..4 and exact match against the
  sample's caption (:func:`~anygpt.eval.synthetic.caption_metrics`);
- ``tts`` (needs an ASR model directory, e.g. a local Whisper or wav2vec 2.0 CTC export that
  ``transformers.pipeline("automatic-speech-recognition")`` loads): text -> speech, sampled with the
  speech defaults; the speech is rendered (SoundStorm + SpeechTokenizer, as the chat does), transcribed
  by the ASR model and scored by WER against the text: intelligibility.  The same ASR model also
  transcribes the *reference* codes resynthesised by the codec, so the report shows the ceiling that
  codec + ASR allow (``reference_wer``) next to the model's ``wer``.

Samples without text, conversation samples, modalities not in the layout, codes outside the layout's
range and unreadable shards are skipped, counted (``skipped`` in the result) and logged; the run goes on.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

TASKS = ("asr", "caption", "tts")


def held_out_pairs(shards: str, modalities: Sequence[str], items: int) -> tuple[dict[str, list], dict[str, int]]:
    """Up to ``items`` ``(key, text, codes)`` per modality from the shards, and skip counts by reason."""
    from anygpt.data.shards import expand_shards

    pairs: dict[str, list] = {m: [] for m in modalities}
    skipped = {"no_text": 0, "conversation": 0, "other_modality": 0, "corrupt_shards": 0}
    for sample in _readable_samples(expand_shards(shards), skipped):
        meta = sample.get("json") or {}
        if "conversation" in meta:
            skipped["conversation"] += 1
            continue
        found = [m for m in modalities if f"{m}.npy" in sample]
        if not found:
            skipped["other_modality"] += 1
            continue
        text = str(meta.get("text") or "").strip()
        if not text:
            skipped["no_text"] += 1
            continue
        m = found[0]
        if len(pairs[m]) < items:
            pairs[m].append((sample["__key__"], text, sample[f"{m}.npy"]))
        if all(len(v) >= items for v in pairs.values()):
            break
    return pairs, skipped


def _readable_samples(paths: Sequence[str], skipped: dict[str, int]) -> Iterator[dict]:
    """Samples of every shard that reads; a corrupt or truncated shard is logged, counted and skipped
    (the samples before the damage are kept)."""
    import tarfile

    from data_pipeline.shards import iter_samples

    for path in paths:
        try:
            yield from iter_samples(path)
        except (tarfile.TarError, OSError, ValueError, EOFError) as e:
            skipped["corrupt_shards"] += 1
            print(f"warning: {path}: unreadable shard skipped ({str(e).splitlines()[0] if str(e) else type(e).__name__})",
                  file=sys.stderr)


def check_asr_dir(asr_model: str | Path) -> Path:
    """The ASR model must be a local Hugging Face model directory (nothing is downloaded)."""
    path = Path(asr_model)
    if not (path / "config.json").is_file():
        raise ValueError(f"--asr-model {path}: not a local Hugging Face model directory (no config.json)")
    return path


def load_asr(asr_model: str | Path, device: Any) -> Any:
    """A ``transformers`` ASR pipeline from a local directory (no download); one-line error otherwise."""
    from transformers import pipeline

    path = check_asr_dir(asr_model)
    dev = device if getattr(device, "type", "cpu") == "cuda" else -1
    return pipeline("automatic-speech-recognition", model=str(path), device=dev)


def transcribe(asr: Any, waves: Sequence[np.ndarray], sample_rate: int) -> list[str]:
    """Transcribe waveforms at ``sample_rate``, resampled to the ASR model's own rate."""
    import soxr

    target = int(asr.feature_extractor.sampling_rate)
    inputs = [{"raw": (soxr.resample(w, sample_rate, target) if sample_rate != target else w).astype(np.float32),
               "sampling_rate": target} for w in waves]
    return [str(r["text"]) for r in asr(inputs, batch_size=8)]


def evaluate_real(lm: Any, media: Any, shards: str, *, items: int = 100, tasks: Sequence[str] = TASKS,
                  asr_model: str | Path | None = None, batch_size: int = 8, seed: int = 0) -> dict[str, Any]:
    """Run the harness (see the module docstring); returns one dict per task that ran."""
    from anygpt.eval.run import answer_media, answer_text
    from anygpt.eval.synthetic import asr_wer, caption_metrics
    from anygpt.infer.settings import GenerationConfig

    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown eval task(s) {', '.join(unknown)}; choose from {', '.join(TASKS)}")
    if "tts" in tasks and asr_model is None:
        raise ValueError("the tts task needs --asr-model DIR (a local speech recognition model)")
    modalities = [m for m in ("speech", "image", "music") if m in lm.layout.modalities]
    pairs, skipped = held_out_pairs(shards, modalities, items)
    greedy = GenerationConfig(max_new_tokens=512, seed=seed).with_greedy()
    results: dict[str, Any] = {"skipped": skipped}

    def to_text(m: str) -> tuple[list[str], list[str]]:
        spec = lm.layout.modality(m)
        kept = []
        for key, text, codes in pairs[m]:
            # Codes outside the layout's range (shards made with another codec) cannot be a prompt.
            if codes.ndim == 2 and codes.shape[0] >= spec.num_codebooks and codes.size and codes.min() >= 0 \
                    and codes[:spec.num_codebooks].max() < spec.codebook_size:
                kept.append((text, codes))
            else:
                skipped["bad_codes"] = skipped.get("bad_codes", 0) + 1
                print(f"warning: {key}: {m} codes of shape {codes.shape} do not fit the layout; skipped",
                      file=sys.stderr)
        return answer_text(lm, m, [c for _, c in kept], greedy, batch_size), [t for t, _ in kept]

    if "asr" in tasks and pairs.get("speech"):
        t0 = time.perf_counter()
        hyps, refs = to_text("speech")
        results["asr"] = {**asr_wer(hyps, refs), "examples": _examples(hyps, refs),
                          "seconds": round(time.perf_counter() - t0, 1)}
    if "caption" in tasks:
        for m in ("image", "music"):
            if pairs.get(m):
                t0 = time.perf_counter()
                hyps, refs = to_text(m)
                results[f"caption_{m}"] = {**caption_metrics(hyps, refs), "examples": _examples(hyps, refs),
                                           "seconds": round(time.perf_counter() - t0, 1)}
    if "tts" in tasks and pairs.get("speech"):
        t0 = time.perf_counter()
        asr = load_asr(asr_model, lm.device)
        codec = media.codec("speech")
        sr = int(codec.sample_rate)
        # Reference codes the codec cannot decode (another codec's shards) leave the tts set, counted.
        fits = [(t, c) for _, t, c in pairs["speech"] if c.size and 0 <= c.min() and c.max() < codec.codebook_size]
        skipped["tts_bad_reference_codes"] = len(pairs["speech"]) - len(fits)
        texts = [t for t, _ in fits]
        generated = answer_media(lm, "speech", texts, GenerationConfig(max_new_tokens=1500, seed=seed), batch_size)
        waves, empty = [], 0
        for codes in generated:
            if codes.shape[-1] == 0:
                empty += 1
                waves.append(np.zeros(sr // 10, dtype=np.float32))  # silence: transcribed as (almost) nothing
                continue
            full = media.speech_codes(np.asarray(codes[0], dtype=np.int64), None, [])
            waves.append(np.asarray(codec.decode([full])[0], dtype=np.float32))
        hyps = transcribe(asr, waves, sr)
        reference = [np.asarray(codec.decode([codes])[0], dtype=np.float32) for _, codes in fits]
        ref_hyps = transcribe(asr, reference, sr)
        results["tts"] = {**asr_wer(hyps, texts), "reference_wer": asr_wer(ref_hyps, texts)["wer"],
                          "empty_answers": empty, "examples": _examples(hyps, texts),
                          "seconds": round(time.perf_counter() - t0, 1)}
    return results


def _examples(hyps: Sequence[str], refs: Sequence[str], n: int = 5) -> list[dict[str, str]]:
    return [{"reference": r, "prediction": h} for h, r in zip(hyps[:n], refs[:n])]


def summary_lines(results: dict[str, Any]) -> list[str]:
    """One line per task for the console."""
    lines = []
    if "asr" in results:
        r = results["asr"]
        lines.append(f"asr (speech->text)    WER {r['wer']:.3f} on {r['n']} utterances")
    for m in ("image", "music"):
        if f"caption_{m}" in results:
            r = results[f"caption_{m}"]
            lines.append(f"caption ({m}->text) BLEU-4 {r['bleu4']:.3f}  BLEU-1 {r['bleu1']:.3f}  "
                         f"exact {r['exact_match']:.3f} on {r['n']}")
    if "tts" in results:
        r = results["tts"]
        lines.append(f"tts (text->speech)    ASR WER {r['wer']:.3f} (reference resynthesis {r['reference_wer']:.3f}) "
                     f"on {r['n']}")
    skipped = {k: v for k, v in results.get("skipped", {}).items() if v}
    if skipped:
        lines.append("skipped samples: " + ", ".join(f"{k} {v}" for k, v in skipped.items()))
    return lines
