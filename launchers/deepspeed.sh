#!/bin/bash
# Single-node mmfm training with the DeepSpeed launcher (parallel.engine=deepspeed layouts;
# torchrun works for them as well, since mmfm creates the process group itself).
#
#   NPROC=8 launchers/deepspeed.sh configs/text_moe_small.yaml parallel.engine=deepspeed \
#       parallel.zero_stage=2 parallel.ep=4
#
# Multi-node DeepSpeed runs use a hostfile (`deepspeed --hostfile ...`); under SLURM prefer
# launchers/slurm.sbatch, which starts the same ranks through torchrun.
set -euo pipefail
if [ $# -lt 1 ]; then
    echo "usage: [NPROC=N] $0 CONFIG [key.path=value ...]" >&2
    exit 2
fi
NPROC=${NPROC:-$(nvidia-smi -L 2>/dev/null | wc -l)}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec deepspeed --num_gpus "$NPROC" --no_local_rank --module mmfm.cli train "$@"
