"""Evaluation: metrics for the synthetic demo task and the real-data harness.

Nothing heavy is imported here; :mod:`anygpt.eval.synthetic` holds the metrics (attribute accuracy,
nearest-reference judging of generated codes, WER, BLEU) with their chance levels.
"""
