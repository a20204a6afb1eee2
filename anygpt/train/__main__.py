"""``python -m anygpt.train --config FILE ...``: one rank of a training run (what ``torchrun -m`` starts)."""
import sys

from anygpt.train.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
