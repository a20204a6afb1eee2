"""The newcomer's demo: a synthetic any-to-any corpus made on the spot (:mod:`anygpt.demo.corpus`) and its
grammar (:mod:`anygpt.demo.grammar`, pure Python, cheap to import for evaluation)."""
