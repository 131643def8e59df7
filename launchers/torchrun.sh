#!/bin/bash
# Single-node mmfm training with torchrun: one process per GPU (or NPROC CPU processes).
#
#   launchers/torchrun.sh configs/text_moe_tiny.yaml parallel.ep=2 train.steps=100
#   NPROC=4 launchers/torchrun.sh configs/text_moe_tiny.yaml parallel.tp=2
#
# NPROC defaults to the number of GPUs; PYTHON to `python`.
set -euo pipefail
if [ $# -lt 1 ]; then
    echo "usage: [NPROC=N] $0 CONFIG [key.path=value ...]" >&2
    exit 2
fi
if [ -z "${NPROC:-}" ]; then
    NPROC=$(nvidia-smi -L 2>/dev/null | wc -l)
    [ "$NPROC" -gt 0 ] || { echo "no GPU found: set NPROC (CPU processes over gloo)" >&2; exit 2; }
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "${PYTHON:-python}" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" \
    -m mmfm.cli train "$@"
