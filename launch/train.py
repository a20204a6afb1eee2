# deepspeed launch/train.py --config launch/configs/stage1_pretrain.yaml
"""Train the AnyGPT LM: DeepSpeed (ZeRO-3 by default), staged by YAML config, exactly resumable.

Thin entry point; everything lives in :mod:`anygpt.train`.  Same as ``anygpt train`` (which can also
start N local ranks itself with ``--nproc N``).  Examples:

    deepspeed launch/train.py --config launch/configs/stage1_pretrain.yaml run.dir=runs/stage1
    deepspeed --num_accelerators 2 launch/train.py --config launch/configs/tiny_cpu.yaml   # CPU, 2 ranks
    torchrun --nproc_per_node 2 launch/train.py --config launch/configs/tiny_cpu.yaml --resume auto
    deepspeed --hostfile launch/hostfile.example launch/train.py --config launch/configs/stage2_sft.yaml
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from anygpt.train.cli import train_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(train_main())
