#!/bin/bash
# sbatch --array=0-15 launch/slurm_preprocess.sh --recipe mls --input /data/mls_english --out /data/shards/mls --codecs codecs/
# Preprocessing as a SLURM array job: one array task per rank. Each task takes its rank and the world
# size from SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN and SLURM_ARRAY_TASK_COUNT, and writes only the
# chunks c with c % world_size == rank; the first task to start lists the corpus once (OUT/plan.json),
# the others read it. --out, the media and codecs/ must be on storage every node sees.
#
# After a partial failure, ask what is missing and resubmit only that (array ids are then ranks):
#   python launch/preprocess.py --out /data/shards/mls --status        # exit 3: prints --array=3,7
#   sbatch --array=3,7 launch/slurm_preprocess.sh --world-size 16 <the same arguments>
# Rerunning a task is always safe: finished chunks are kept, unfinished ones redone.
#SBATCH --job-name=anygpt-preprocess
#SBATCH --ntasks=1
#SBATCH --gpus-per-task=1
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --output=logs/%x-%A_%a.out
#SBATCH --requeue
set -euo pipefail

if [ -z "${SLURM_ARRAY_TASK_ID:-}" ]; then
  echo "error: submit with sbatch --array=0-N (one task per rank); see the first line of $0" >&2
  exit 1
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-8}}

mkdir -p logs
# One process per array task (--ntasks=1): the rank is the array task's index. With --ntasks=N per task,
# srun starts N ranks per task (rank = index * N + SLURM_PROCID) and each uses one of the task's GPUs.
srun --kill-on-bad-exit=1 python launch/preprocess.py "$@" --no-progress
