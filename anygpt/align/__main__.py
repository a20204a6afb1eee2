"""``python -m anygpt.align --config FILE ...``: one rank of ``anygpt align`` (what ``--nproc N`` starts)."""
import sys

from anygpt.align.cli import align_main

if __name__ == "__main__":
    sys.exit(align_main())
