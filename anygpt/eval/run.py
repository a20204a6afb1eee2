"""The model's answers for evaluation, shared by every evaluator (the real-data harness, the demo's task).

:func:`answer_text` (X->text) and :func:`answer_media` (text->X) render each task with the generator's own
:class:`~anygpt.formats.SequenceFormat` through :mod:`anygpt.infer.tasks`, so an evaluator scores exactly
what ``anygpt generate`` would answer.  Scoring lives in :mod:`anygpt.eval.metrics`; the held-out loss
in :mod:`anygpt.eval.loss`.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from anygpt.formats import Media
from anygpt.infer.settings import GenerationConfig
from anygpt.infer.tasks import Task, task_config, task_conversation

__all__ = ["answer_text", "answer_media"]


def _generate(lm: Any, prompts: list[np.ndarray], config: GenerationConfig, batch_size: int) -> list[Any]:
    out = []
    for start in range(0, len(prompts), batch_size):
        out += lm.generator.generate(prompts[start: start + batch_size], config)
    return out


def answer_text(lm: Any, modality: str, codes: list[np.ndarray], config: GenerationConfig,
                batch_size: int = 8) -> list[str]:
    """The model's text answer to each X->text task (the layout's codebooks of ``codes`` as input).

    Args:
        lm: a loaded model (:func:`anygpt.infer.loading.load_lm`).
        modality: the input modality.
        codes: one ``[K, T]`` code array per task (extra codebooks are cut to the layout's).
        config: generation settings (the X->text task's instruction settings are applied on top).
        batch_size: rows per ``generate`` call.
    """
    k = lm.layout.modality(modality).num_codebooks
    task = Task(modality, "text", "<eval>")
    prompts = [lm.generator.format.prompt(task_conversation(task, Media(modality, c[:k]))) for c in codes]
    return [o.text.strip() for o in _generate(lm, prompts, task_config(task, config), batch_size)]


def answer_media(lm: Any, modality: str, texts: list[str], config: GenerationConfig,
                 batch_size: int = 8) -> list[np.ndarray]:
    """The codes ``[K, T]`` of the first ``modality`` span of each text->X answer (``T = 0`` when none).

    Args:
        lm: a loaded model (:func:`anygpt.infer.loading.load_lm`).
        modality: the output modality.
        texts: one caption / transcript per task.
        config: generation settings (sampling inside spans comes from its per-modality modes).
        batch_size: rows per ``generate`` call.
    """
    k = lm.layout.modality(modality).num_codebooks
    prompts = [lm.generator.format.prompt(task_conversation(Task("text", modality, t), None)) for t in texts]
    outs = _generate(lm, prompts, task_config(Task("text", modality, "<eval>"), config), batch_size)
    spans = [[p for p in o.parts if isinstance(p, Media) and p.modality == modality] for o in outs]
    return [s[0].codes if s else np.zeros((k, 0), dtype=np.int64) for s in spans]
