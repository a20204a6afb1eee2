"""Training: DeepSpeed engine (ZeRO-3 by default), staged configs, exact resume, export, watching a run.

Modules (each importable on its own; heavy libraries load only when used):

- :mod:`anygpt.train.cli`        ``anygpt train|export|plot``, ``bench train``, ``launch/train.py``
- :mod:`anygpt.train.preflight`  every check that needs no process (runs before ranks start)
- :mod:`anygpt.train.dsconfig`   DeepSpeed JSON + YAML -> one resolved config ("auto" fields)
- :mod:`anygpt.train.engine`     process group, model under ZeRO init, LoRA, AdamW, ``deepspeed.initialize``
- :mod:`anygpt.train.loop`       :class:`~anygpt.train.loop.Trainer` and :func:`~anygpt.train.loop.train`
- :mod:`anygpt.train.losses`     next-token loss with per-modality / per-task breakdown
- :mod:`anygpt.train.checkpoint` complete-only checkpoints, ``latest`` pointer, keep-last-K, RNG state
- :mod:`anygpt.train.export`     ZeRO shards -> Hugging Face directory (LoRA merged)
- :mod:`anygpt.train.metrics`    ``metrics.jsonl``, ``eval.jsonl``, TensorBoard, W&B, progress bar
- :mod:`anygpt.train.plot`       loss curves PNG
- :mod:`anygpt.train.schedule`   warmup + cosine
- :mod:`anygpt.train.faults`     fault injection for the failure-path tests
- :mod:`anygpt.train.bench`      trainer step vs bare DeepSpeed loop

Run directory (``run.dir``)::

    config.yaml      the resolved config (re-runnable: anygpt train --config RUN_DIR/config.yaml --resume auto)
    metrics.jsonl    one JSON object per logged step (step, loss, lr, grad_norm, tokens_per_s, per-modality/task)
    eval.jsonl       one JSON object per evaluation (loss overall, per modality, per task/direction)
    tb/              TensorBoard event files
    loss.png         loss curves (rewritten at every save and at the end; ``anygpt plot RUN_DIR``)
    checkpoints/     see :mod:`anygpt.train.checkpoint`
"""
