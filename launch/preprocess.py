# python launch/preprocess.py --source manifest --input corpus/manifest.jsonl --out shards/ --codecs codecs/ --workers 4
"""Thin entry for preprocessing (same flags as ``anygpt preprocess``); the logic is in ``data_pipeline``.

Examples:
    python launch/preprocess.py --recipe laion_coco --input /data/laion-coco-wds --out /data/shards/laion_coco --codecs codecs/
    srun -n 8 python launch/preprocess.py --recipe mls --input /data/mls_english --out /data/shards/mls --codecs codecs/
    sbatch --array=0-15 launch/slurm_preprocess.sh ...   (one rank per array task; see that script)
    (ranks: --rank/--world-size, else RANK/WORLD_SIZE, else the SLURM array task, else SLURM_PROCID/SLURM_NTASKS;
     rerun the same command to resume; add --status to list what is pending as an --array= expression)
"""
import sys

from data_pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main())
