"""``anygpt eval``: held-out loss per modality and direction, and the synthetic task's six directions.

Loss: the eval loader renders every pair in both directions with response-only loss, so
``text2image`` is the loss of generating the image given the caption, and so on.

Synthetic task (``--corpus DIR`` from ``anygpt demo``): every direction on held-out items, scored
against its chance level (:mod:`anygpt.eval.synthetic`):

- X->text: greedy caption/transcript, parsed back into attributes (mean attribute accuracy);
- text->X: sampled codes judged by the nearest *reference*: every caption of the grammar is rendered
  (Pillow / espeak-ng / NumPy) and encoded with the same codec, next to the training items' codes,
  and the generated codes get the attributes of the closest reference (bag-of-codes cosine; for
  images per query slot, see :func:`judge_codes`).  So a text->image answer scores only if its
  codes look like an image of the requested attributes.
"""
from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

MODALITIES = ("image", "speech", "music")


def shard_loss(lm: Any, shards: str, seq_len: int = 512, batch_size: int = 8, max_batches: int | None = None,
               attention: str = "auto") -> dict:
    """Mean response loss per task (direction) and per modality over held-out shards.

    ``attention``: the packed-row attention path (:mod:`anygpt.attention`; ``auto`` = what training
    would use on this device), so a user can check a path's numbers on their own data.
    """
    import torch

    from anygpt.attention import LOADER_ATTENTION, attention_inputs, resolve_attention, using_attention
    from anygpt.config import DataConfig, SourceConfig, TrainConfig
    from anygpt.data import TASK_NAMES, build_eval_loader

    path = resolve_attention(attention, lm.device.type, training=False, key="--attention")
    cfg = TrainConfig(data=DataConfig(sources=[SourceConfig(name="eval", shards=shards)], eval_shards=shards,
                                      seq_len=seq_len))
    loader = build_eval_loader(cfg, lm.tokenizer, lm.layout, batch_size=batch_size,
                               attention=LOADER_ATTENTION[path])
    sums = np.zeros(len(TASK_NAMES))
    counts = np.zeros(len(TASK_NAMES))
    model = lm.model
    # Generation afterwards (--demo, --generate) runs on the model's own implementation again.
    with torch.no_grad(), using_attention(model, path):
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            dev = lm.device
            logits = model(**attention_inputs(batch, path, dev)).logits.float()
            labels = batch["labels"].to(dev)[:, 1:]
            tasks = batch["tasks"].to(dev)[:, 1:]
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels.clamp_min(0),
                                                    reduction="none")
            valid = labels != -100
            for t in range(len(TASK_NAMES)):
                sel = valid & (tasks == t)
                sums[t] += float(nll[sel].sum())
                counts[t] += int(sel.sum())
    per_task = {TASK_NAMES[t]: sums[t] / counts[t] for t in range(len(TASK_NAMES)) if counts[t]}
    total = float(sums.sum() / max(counts.sum(), 1))
    per_modality = {}
    for m in MODALITIES:
        idx = [t for t, n in enumerate(TASK_NAMES) if m in n and counts[t]]
        if idx:
            per_modality[m] = float(sums[idx].sum() / counts[idx].sum())
    return {"loss": total, "loss_by_task": per_task, "loss_by_modality": per_modality,
            "tokens": int(counts.sum()), "attention": path}


def _test_items(shards_dir: Path, modality: str, n: int, with_keys: bool = False) -> list[tuple]:
    """First ``n`` held-out items (text, codes) of a test shard set; shards keep manifest order, in
    which the demo corpus puts novel (held-out) combinations first."""
    from data_pipeline.shards import iter_samples

    items = []
    for sample in iter_samples(shards_dir):
        item = (sample["json"]["text"], sample[f"{modality}.npy"])
        items.append((sample["__key__"], *item) if with_keys else item)
    return items[:n]


def _attribute_hits(scores: dict, ref_attrs: list[dict], wanted: list[dict]) -> list[float]:
    """Per item: fraction of requested attributes that the nearest reference has (0 when empty)."""
    out = []
    for pred, want in zip(scores["predictions"], wanted):
        got = ref_attrs[pred] if pred >= 0 else {}
        out.append(sum(got.get(a) == v for a, v in want.items()) / max(len(want), 1))
    return out


def _references(modality: str, codec: Any, layout: Any, work: Path, shards_root: Path,
                max_train: int = 400) -> tuple[list[np.ndarray], list[dict]]:
    """Reference codes with their attributes: one rendering of *every* grammar combination (held-out
    ones included) plus up to ``max_train`` training items (the codec's real spread of renderings)."""
    from anygpt.demo.corpus import render_reference
    from anygpt.demo.grammar import all_combinations, describe, parse_attributes
    from anygpt.modalities.fit import load_inputs

    combos = all_combinations(modality)
    ext = "png" if modality == "image" else "wav"
    paths = [render_reference(modality, describe(modality, c), work / f"{modality}-{i}.{ext}")
             for i, c in enumerate(combos)]
    k = layout.modality(modality).num_codebooks
    codes = [c[:k] for c in codec.encode(load_inputs(modality, paths, codec.sample_rate))]
    attrs = list(combos)
    for text, c in _test_items(shards_root / f"train_{modality}", modality, max_train):
        codes.append(c[:k])
        attrs.append(parse_attributes(modality, text))
    return codes, attrs


def judge_codes(modality: str, codes: list[np.ndarray], codebook_size: int) -> tuple[list[np.ndarray], int]:
    """Codes as the judge compares them.  Images: each (slot, code) pair becomes one symbol, so the
    bag-of-codes cosine becomes the fraction of the 32 query slots that agree (a SEED code's meaning
    depends on its query slot).  Audio stays a bag of codes per codebook (robust to timing)."""
    if modality != "image":
        return codes, codebook_size
    out = [c + (np.arange(c.shape[-1]) * codebook_size)[None] for c in codes]
    return out, codebook_size * max((c.shape[-1] for c in codes), default=1)


# text->X sampling of the synthetic task: the per-modality defaults (AnyGPT's release settings) without
# their repetition penalties (speech 1.05, music 1.15), which suit full 1024/2048-code books; with the
# few dozen codes a fitted tiny codec uses, they push away the repeats a held note or a rest is made of.
SYNTHETIC_SAMPLING = ("all.repetition_penalty=1.0",)


def evaluate_synthetic(lm: Any, codecs: dict[str, Any], shards_root: Path, n_items: int = 48,
                       batch_size: int = 8, seed: int = 0,
                       sampling: Sequence[str] = SYNTHETIC_SAMPLING) -> dict[str, Any]:
    """Score the six directions on ``n_items`` held-out test items per direction (half of them novel
    attribute combinations, half new renderings of seen ones) from the demo's test shards.
    ``sampling``: ``MODE.FIELD=VALUE`` overrides of the text->X sampling settings."""
    from anygpt.demo.grammar import parse_attributes
    from anygpt.eval.synthetic import attribute_accuracy, nearest_reference_accuracy
    from anygpt.infer.settings import GenerationConfig, apply_setting_overrides

    # X->text is scored greedily (one best caption).  text->X samples with the per-modality defaults
    # (seeded): the argmax of every code slot is the majority code (background), so greedy media
    # collapse to one mode, while samples follow the model's conditional distribution.
    sampled = GenerationConfig(max_new_tokens=512, seed=seed)
    sampled.modes = apply_setting_overrides(sampled.modes, sampling)
    base = sampled.with_greedy()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for m in MODALITIES:
            # Half novel (held-out attribute combinations: composition), half seen combinations
            # rendered afresh (generalisation to new renderings); each half is also scored alone.
            everything = _test_items(shards_root / f"test_{m}", m, 10**9, with_keys=True)
            novel_items = [it for it in everything if "novel" in it[0]]
            seen_items = [it for it in everything if "novel" not in it[0]]
            items = novel_items[: n_items // 2] + seen_items[: n_items - min(n_items // 2, len(novel_items))]
            keys = [key for key, _, _ in items]
            items = [(t, c) for _, t, c in items]
            k = lm.layout.modality(m).num_codebooks
            texts = [t for t, _ in items]
            # X -> text
            t0 = time.perf_counter()
            preds = answer_text(lm, m, [codes for _, codes in items], base, batch_size)
            scores = attribute_accuracy(m, preds, texts)
            novel = [i for i, key in enumerate(keys) if "novel" in key]
            seen = [i for i in range(len(keys)) if i not in set(novel)]
            scores["by_split"] = {name: attribute_accuracy(m, [preds[i] for i in idx], [texts[i] for i in idx])["score"]
                                  for name, idx in (("novel", novel), ("seen", seen)) if idx}
            results[f"{m}2text"] = {**scores, "examples": [{"reference": r, "prediction": p} for r, p in
                                                          zip(texts[:5], preds[:5])],
                                    "seconds": round(time.perf_counter() - t0, 1)}
            # text -> X
            t0 = time.perf_counter()
            refs, ref_attrs = _references(m, codecs[m], lm.layout, Path(tmp), shards_root)
            generated = answer_media(lm, m, texts, sampled, batch_size)
            # The target index only names the requested attributes: any reference with the same
            # attributes counts (reference_attributes), so per-attribute accuracy is what is scored.
            targets = [next(i for i, a in enumerate(ref_attrs) if a == parse_attributes(m, t)) for t in texts]
            size = codecs[m].codebook_size
            gen_j, size_j = judge_codes(m, generated, size)
            refs_j, _ = judge_codes(m, refs, size)
            labels = [json.dumps(a, sort_keys=True) for a in ref_attrs]
            scores = nearest_reference_accuracy(gen_j, targets, refs_j, reference_attributes=ref_attrs,
                                                reference_labels=labels, codebook_size=size_j)
            # The judge's ceiling: the same judge on the items' own codes (held-out renderings, never
            # among the references) -- what a perfect generator of this codec's codes would score.
            true_j, _ = judge_codes(m, [codes[:k] for _, codes in items], size)
            scores["judge_ceiling"] = nearest_reference_accuracy(
                true_j, targets, refs_j, reference_attributes=ref_attrs, reference_labels=labels,
                codebook_size=size_j)["score"]
            hits = _attribute_hits(scores, ref_attrs, [ref_attrs[t] for t in targets])
            scores["by_split"] = {name: float(np.mean([hits[i] for i in idx]))
                                  for name, idx in (("novel", novel), ("seen", seen)) if idx}
            results[f"text2{m}"] = {**scores, "empty_answers": sum(g.shape[-1] == 0 for g in generated),
                                    "seconds": round(time.perf_counter() - t0, 1)}
    return results


def _generate(lm: Any, prompts: list[np.ndarray], config: Any, batch_size: int) -> list[Any]:
    out = []
    for start in range(0, len(prompts), batch_size):
        out += lm.generator.generate(prompts[start: start + batch_size], config)
    return out


def answer_text(lm: Any, modality: str, codes: list[np.ndarray], config: Any, batch_size: int = 8) -> list[str]:
    """The model's text answer to each X->text task (the layout's codebooks of ``codes`` as input)."""
    from anygpt.formats import Media
    from anygpt.infer.tasks import Task, task_config, task_conversation

    k = lm.layout.modality(modality).num_codebooks
    task = Task(modality, "text", "<eval>")
    prompts = [lm.generator.format.prompt(task_conversation(task, Media(modality, c[:k]))) for c in codes]
    return [o.text.strip() for o in _generate(lm, prompts, task_config(task, config), batch_size)]


def answer_media(lm: Any, modality: str, texts: list[str], config: Any, batch_size: int = 8) -> list[np.ndarray]:
    """The codes ``[K, T]`` of the first ``modality`` span of each text->X answer (``T = 0`` when none)."""
    from anygpt.formats import Media
    from anygpt.infer.tasks import Task, task_config, task_conversation

    k = lm.layout.modality(modality).num_codebooks
    prompts = [lm.generator.format.prompt(task_conversation(Task("text", modality, t), None)) for t in texts]
    outs = _generate(lm, prompts, task_config(Task("text", modality, "<eval>"), config), batch_size)
    spans = [[p for p in o.parts if isinstance(p, Media) and p.modality == modality] for o in outs]
    return [s[0].codes if s else np.zeros((k, 0), dtype=np.int64) for s in spans]


def summary_table(results: dict[str, Any]) -> str:
    """One line per direction: score, chance, ratio, the novel/seen split when known, and for text->X
    the judge's ceiling (the judge on the held-out items' own codes)."""
    lines = [f"{'direction':<13} {'score':>7} {'chance':>7} {'x chance':>9} {'novel':>7} {'seen':>7} {'ceiling':>8}"]
    for name, r in results.items():
        ratio = r["score"] / r["chance"] if r.get("chance") else math.nan
        split = r.get("by_split", {})
        cells = "".join(f" {split[k]:>7.3f}" if k in split else f" {'-':>7}" for k in ("novel", "seen"))
        cells += f" {r['judge_ceiling']:>8.3f}" if "judge_ceiling" in r else f" {'-':>8}"
        lines.append(f"{name:<13} {r['score']:>7.3f} {r['chance']:>7.3f} {ratio:>8.1f}x{cells}")
    return "\n".join(lines)
