"""Preference alignment of text->X generation on the training engine: offline, SpeechAlign-style or reward-ranked DPO
and online GRPO with a registry of rewards (ASR intelligibility, the demo's judge, guards).

Modules (each importable on its own; heavy libraries load only when used):

- :mod:`anygpt.align.config`   the stage YAML schema (``run``/``model``/``optim`` of training + ``align``)
- :mod:`anygpt.align.losses`   GRPO (clipped ratio, group advantages, KL) and DPO objectives
- :mod:`anygpt.align.rewards`  the reward registry (``asr``, ``judge``, ``code_frequency``), guards, composition
- :mod:`anygpt.align.rollout`  prompts, pairs, the gathered-once generation replica, forward passes
- :mod:`anygpt.align.loop`     :class:`~anygpt.align.loop.AlignTrainer` and :func:`~anygpt.align.loop.align`
- :mod:`anygpt.align.plot`     ``reward.png``
- :mod:`anygpt.align.cli`      ``anygpt align``, ``launch/align.py``
- :mod:`anygpt.align.bench`    ``anygpt bench align``

Run directory: as training's (``config.yaml``, ``metrics.jsonl`` with ``step``, ``loss``, ``reward``,
``reward_parts``, ``tb/``, ``checkpoints/``) plus ``reward.png``; ``anygpt export`` works on it.
"""
