# deepspeed launch/align.py --config launch/configs/align_grpo_whisper.yaml
"""Align a trained model's text->X generation (GRPO with rewards, or DPO) on the training engine.

Thin entry point; everything lives in :mod:`anygpt.align`.  Same as ``anygpt align`` (which can also
start N local ranks itself with ``--nproc N``).  Examples:

    deepspeed launch/align.py --config launch/configs/align_grpo_whisper.yaml model.name=models/anygpt-sft
    deepspeed launch/align.py --config launch/configs/align_dpo.yaml --resume auto
    torchrun --nproc_per_node 2 launch/align.py --config launch/configs/align_demo.yaml   # CPU, 2 ranks
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from anygpt.align.cli import align_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(align_main())
