#!/usr/bin/env bash
# One host, all its GPUs: a single process sees every GPU; the batch is sharded over them.
#   CONFIG=configs/dinov2_vitl14.py WORKDIR=runs/l14 launch/gpu_host.sh [--config.key=value ...]
# Needs jax with CUDA (pip install -e . 'jax[cuda12]'). DRY_RUN=1 only prints.
set -euo pipefail
source "$(dirname "$0")/common.sh"
CONFIG=${CONFIG:-configs/dinov2_vits14.py}
WORKDIR=${WORKDIR:-runs/$(basename "$CONFIG" .py)}
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
run python -m dino_jax.train --config "$CONFIG" --workdir "$WORKDIR" "$@"
