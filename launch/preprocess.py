# python launch/preprocess.py --source manifest --input corpus/manifest.jsonl --out shards/ --codecs codecs/ --workers 4
"""Thin entry for preprocessing (same flags as ``anygpt preprocess``); the logic is in ``data_pipeline``.

Examples:
    python launch/preprocess.py --recipe laion_coco --input /data/laion-coco-wds --out /data/shards/laion_coco --codecs codecs/
    srun -n 8 python launch/preprocess.py --recipe mls --input /data/mls_english --out /data/shards/mls --codecs codecs/
    (ranks come from SLURM_PROCID/SLURM_NTASKS or RANK/WORLD_SIZE; rerun the same command to resume)
"""
import sys

from data_pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main())
