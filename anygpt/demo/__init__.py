"""The newcomer's demo (``anygpt demo``): a synthetic any-to-any corpus made on the spot
(:mod:`anygpt.demo.corpus`), its grammar (:mod:`anygpt.demo.grammar`: the per-modality content; the
demo runs on every registered modality that has some), the scores of its task
(:mod:`anygpt.demo.scoring`, :mod:`anygpt.demo.evaluate`, built on :mod:`anygpt.eval`) and the
pipeline that ties them together (:mod:`anygpt.demo.run`).  The demo imports eval, never the other way
round."""
