#!/bin/bash
# Fine-tuning on several machines under SLURM: 2 nodes x 8 GPUs, one torchrun per node, which starts one
# process per GPU; the processes find each other through the rendezvous on the first node (torch's c10d).
#
#     sbatch examples/slurm_train.sh
#
# --train-batch-size is per process: here 2 nodes x 8 GPUs x 4 = 64 examples per optimizer step. The learning rate
# is used as given; add --scale-lr to multiply it by those 64 (as diffusers' --scale_lr does).
# OUT must be on a file system every node sees: rank 0 writes the checkpoints there and every process resumes
# from them. --resume is always on, so a requeued or rerun job continues from the last checkpoint (a fresh OUT
# starts from step 0).
#SBATCH --job-name=minisd-train
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=12:00:00
#SBATCH --requeue
#SBATCH --output=%x-%j.out
set -euo pipefail

OUT=${OUT:-runs/style}
DATA=${DATA:-captioned/}
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}

srun torchrun \
    --nnodes "$SLURM_NNODES" --nproc-per-node "${SLURM_GPUS_ON_NODE:-8}" \
    --rdzv-backend c10d --rdzv-endpoint "$HEAD_NODE:29500" --rdzv-id "$SLURM_JOB_ID" \
    -m minisd train finetune --model sd15 --data "$DATA" --out "$OUT" \
    --resolution 512 --train-batch-size 4 --max-train-steps 2000 --learning-rate 1e-5 \
    --mixed-precision bf16 --gradient-checkpointing --checkpointing-steps 200 --resume
