#!/bin/bash
# sbatch launch/slurm_train.sh launch/configs/stage1_pretrain.yaml run.dir=runs/stage1
# Multi-node training under SLURM: one torchrun per node, torchrun starts one rank per GPU; ranks,
# world size and the rendezvous come from SLURM. Resubmitting the same job continues the run
# (--resume auto picks the newest complete checkpoint of run.dir; a fresh start when there is none).
#SBATCH --job-name=anygpt-train
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=72:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --requeue
set -euo pipefail

CONFIG=${1:?usage: sbatch launch/slurm_train.sh CONFIG.yaml [key=value ...]}
shift
GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-8}
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-29500}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export NCCL_ASYNC_ERROR_HANDLING=1

mkdir -p logs
srun --kill-on-bad-exit=1 torchrun \
  --nnodes "$SLURM_NNODES" --nproc_per_node "$GPUS_PER_NODE" \
  --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "$SLURM_JOB_ID" \
  launch/train.py --config "$CONFIG" "$@" --resume auto
