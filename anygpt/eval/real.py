"""Real-data harness of ``anygpt eval --generate``: the model answers held-out shard samples.

Held-out ``(text, media)`` pairs are read through the project's one shard reader and sample schema
(:mod:`anygpt.data.shards`, :mod:`anygpt.data.schema`), up to ``items`` per modality of the model's
layout.  Which tasks run on a modality follows from its plugin's ``text_kind``:

- ``"transcript"`` (the text is what is said):
  ``asr_<modality>``: X -> text, greedy; corpus WER (jiwer, normalised text on both sides) against
  the transcript; and ``tts_<modality>`` (needs a local ASR model directory, a Whisper or
  wav2vec 2.0-style CTC model saved with its processor, checked and loaded by
  :mod:`anygpt.eval.asr`, and a codec with a ``sample_rate``): text -> X, sampled with the modality's defaults; the answer is
  completed by the plugin (speech: SoundStorm fills the acoustic layers), decoded, transcribed by the
  ASR model and scored by WER against the text: intelligibility.  The same ASR model transcribes the
  *reference* codes resynthesised by the codec, so the report shows the ceiling that codec + ASR
  allow (``reference_wer``) next to the model's ``wer``;
- ``"caption"`` (the text describes it): ``caption_<modality>``: X -> text, greedy; corpus BLEU-1..4
  and exact match against the caption.

Unusable samples (conversations, no text, a modality outside the layout, codes outside the layout's
range) are skipped and counted by reason (``skipped``); a damaged shard is named once on stderr,
its readable samples are used and its loss is counted (``bad_shards``, ``lost_samples``); a task
that fails is reported (``{"error": ...}``) and the results computed before it are kept.
"""
from __future__ import annotations

import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from anygpt import modalities as registry
from anygpt.data.examples import layout_codes
from anygpt.data.schema import SampleError, decode_sample
from anygpt.data.shards import ShardError, expand_shards, iter_shard_samples
from anygpt.eval.asr import load_asr
from anygpt.eval.metrics import asr_wer, caption_metrics
from anygpt.eval.run import answer_media, answer_text
from anygpt.infer.settings import GenerationConfig

TASKS = ("asr", "caption", "tts")


def plan_tasks(layout: Any, tasks: Sequence[str] = TASKS) -> list[tuple[str, str]]:
    """``(task, modality)`` pairs to run for a layout: each modality's plugin says whether its text
    is a transcript (``asr``, ``tts``) or a caption (``caption``)."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown eval task(s) {', '.join(unknown)}; choose from {', '.join(TASKS)}")
    kinds = {"transcript": ("asr", "tts"), "caption": ("caption",)}
    return [(t, m) for m in layout.modalities for t in kinds.get(registry.get(m).text_kind, ()) if t in tasks]


def tts_modalities(layout: Any, tasks: Sequence[str] = TASKS) -> list[str]:
    """Modalities whose ``tts`` task runs (their codecs are needed)."""
    return [m for t, m in plan_tasks(layout, tasks) if t == "tts"]


def held_out_pairs(shards: str, layout: Any, modalities: Sequence[str], items: int) -> tuple[dict[str, list], dict]:
    """Up to ``items`` ``(key, text, codes)`` per modality (all of the shard's codebooks, the layout's
    ones checked), and what reading met: ``skipped`` by reason, ``bad_shards``, ``lost_samples``."""
    pairs: dict[str, list] = {m: [] for m in modalities}
    skipped: Counter = Counter()
    bad: dict[str, str] = {}
    lost = 0
    for url in expand_shards(shards):
        if all(len(v) >= items for v in pairs.values()):
            break
        try:
            for raw in iter_shard_samples(url):
                key = raw.get("__key__", "?")
                try:
                    sample = decode_sample(raw)
                    if sample.kind != "pair":
                        raise SampleError("conversation")
                    modality, member = sample.pair_member(layout.modalities)
                    text = sample.text.strip()
                    codes = sample.codes(member)
                    layout_codes(codes, member, layout, modality, sample.codec(member))
                except SampleError as e:
                    skipped[e.reason] += 1
                    if e.reason not in ("conversation", "unknown_modality"):
                        print(f"warning: {url}: {key}: {e}; skipped", file=sys.stderr)
                    continue
                if modality in pairs and len(pairs[modality]) < items:
                    pairs[modality].append((key, text, codes))
                if all(len(v) >= items for v in pairs.values()):
                    break
        except ShardError as e:
            bad[url] = str(e)
            lost += e.lost or 0
            print(f"warning: damaged shard, going on: {e}", file=sys.stderr)
    return pairs, {"skipped": dict(skipped), "bad_shards": bad, "lost_samples": lost}


def evaluate_real(lm: Any, codecs: Mapping[str, Any] | None, shards: str, *, items: int = 100,
                  tasks: Sequence[str] = TASKS, asr_model: str | Path | None = None,
                  acoustic: Callable[[str], Any] | None = None, batch_size: int = 8,
                  seed: int = 0, asr_language: str | None = "en", results: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the harness (see the module docstring); returns one dict per ``<task>_<modality>`` that ran,
    plus ``skipped``, ``bad_shards`` and ``lost_samples``.

    Args:
        lm: the loaded model (:func:`anygpt.infer.loading.load_lm`).
        codecs: modality -> codec (:func:`anygpt.modalities.load_codecs`); needed by ``tts`` only.
        shards: held-out shard spec.
        acoustic: modality -> its acoustic decoder or None (speech: SoundStorm), for ``tts``.
        asr_language: the language Whisper is told (:func:`anygpt.eval.asr.check_asr_dir`).
        results: a dict to fill in place (so a caller keeps what was computed if a later task raises).
    """
    planned = plan_tasks(lm.layout, tasks)
    if any(t == "tts" for t, _ in planned) and asr_model is None:
        raise ValueError("the tts task needs --asr-model DIR (a local speech recognition model)")
    pairs, reading = held_out_pairs(shards, lm.layout, sorted({m for _, m in planned}), items)
    results = results if results is not None else {}
    results.update(reading)
    greedy = GenerationConfig(max_new_tokens=512, seed=seed).with_greedy()
    asr_pipe: list[Any] = []

    def asr() -> Any:
        if not asr_pipe:
            asr_pipe.append(load_asr(asr_model, lm.device, language=asr_language))
        return asr_pipe[0]

    def to_text(m: str, metric: Callable) -> dict[str, Any]:
        refs = [t for _, t, _ in pairs[m]]
        hyps = answer_text(lm, m, [c for _, _, c in pairs[m]], greedy, batch_size)
        return {**metric(hyps, refs), "examples": _examples(hyps, refs)}

    def tts(m: str) -> dict[str, Any]:
        codec = (codecs or {}).get(m)
        if codec is None or not getattr(codec, "sample_rate", None):
            raise ValueError(f"no {m} codec with a sample rate (pass --codecs DIR with {m}/ inside)")
        sr, plugin = int(codec.sample_rate), registry.get(m)
        # Reference codes the codec cannot decode (another codec's shards) leave the set, counted.
        fits = [(t, c) for _, t, c in pairs[m] if c.shape[0] >= codec.num_codebooks and c.min() >= 0
                and c[: codec.num_codebooks].max() < codec.codebook_size]
        texts = [t for t, _ in fits]
        budget = int(plugin.sampling.get("max_tokens", 1024)) + 16  # the span plus its markers and <eom>
        generated = answer_media(lm, m, texts, GenerationConfig(max_new_tokens=budget, seed=seed), batch_size)
        waves, empty, notes = [], 0, []
        for codes in generated:
            if codes.shape[-1] == 0:
                empty += 1
                waves.append(np.zeros(sr // 10, dtype=np.float32))  # silence: transcribed as (almost) nothing
                continue
            full = plugin.complete_codes(np.asarray(codes, dtype=np.int64), lambda: acoustic(m) if acoustic else None,
                                         None, notes, seed)
            waves.append(np.asarray(codec.decode([full])[0], dtype=np.float32))
        hyps = asr().transcribe(waves, sr)
        reference = [np.asarray(codec.decode([c[: codec.num_codebooks]])[0], dtype=np.float32) for _, c in fits]
        ref_hyps = asr().transcribe(reference, sr)
        return {**asr_wer(hyps, texts), "reference_wer": asr_wer(ref_hyps, texts)["wer"],
                "bad_reference_codes": len(pairs[m]) - len(fits), "empty_answers": empty,
                "notes": sorted(set(notes)), "examples": _examples(hyps, texts)}

    for task, m in planned:
        if not pairs[m] or (task == "tts" and m in (codecs or {}) and not getattr(codecs[m], "sample_rate", None)):
            continue  # nothing to score, or a codec that renders no audio (no intelligibility to measure)
        t0 = time.perf_counter()
        try:
            if task == "tts":
                out = tts(m)
            else:
                out = to_text(m, asr_wer if task == "asr" else caption_metrics)
        except (ValueError, RuntimeError, OSError) as e:  # one task failing keeps the others' results
            message = str(e).splitlines()[0] if str(e) else type(e).__name__
            print(f"warning: {task} on {m} failed: {message}", file=sys.stderr)
            results[f"{task}_{m}"] = {"modality": m, "error": message}
            continue
        results[f"{task}_{m}"] = {"modality": m, **out, "seconds": round(time.perf_counter() - t0, 1)}
    return results


def _examples(hyps: Sequence[str], refs: Sequence[str], n: int = 5) -> list[dict[str, str]]:
    return [{"reference": r, "prediction": h} for h, r in zip(hyps[:n], refs[:n])]


def summary_lines(results: dict[str, Any]) -> list[str]:
    """One line per task for the console."""
    lines = []
    for name, r in results.items():
        if not isinstance(r, dict) or "modality" not in r:
            continue
        task, m = name.split("_", 1)
        if "error" in r:
            lines.append(f"{task} ({m}) failed: {r['error']}")
        elif task == "asr":
            lines.append(f"asr ({m}->text)    WER {r['wer']:.3f} on {r['n']}")
        elif task == "caption":
            lines.append(f"caption ({m}->text) BLEU-4 {r['bleu4']:.3f}  BLEU-1 {r['bleu1']:.3f}  "
                         f"exact {r['exact_match']:.3f} on {r['n']}")
        else:
            lines.append(f"tts (text->{m})    ASR WER {r['wer']:.3f} (reference resynthesis "
                         f"{r['reference_wer']:.3f}) on {r['n']}")
    skipped = {k: v for k, v in results.get("skipped", {}).items() if v}
    if skipped:
        lines.append("skipped samples: " + ", ".join(f"{k} {v}" for k, v in skipped.items()))
    if results.get("bad_shards"):
        lines.append(f"damaged shards: {len(results['bad_shards'])} ({results.get('lost_samples', 0)} samples lost): "
                     + ", ".join(Path(u).name for u in results["bad_shards"]))
    return lines
