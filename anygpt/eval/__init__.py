"""Evaluation: metrics any evaluator imports, the model's answers, and the real-data harness.

:mod:`anygpt.eval.metrics` (WER, BLEU, judges of generated codes, with their chance levels) depends on
nothing else in the project; :mod:`anygpt.eval.run` holds the model's answers to X->text / text->X
tasks.  Nothing here imports the demo: the demo's synthetic task (:mod:`anygpt.demo.evaluate`) imports
eval, and ``anygpt eval --demo DIR`` finds its scorer by the name in ``DIR/eval_suite.json``.
"""
