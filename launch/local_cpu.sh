#!/usr/bin/env bash
# This machine's CPU: one process with DEVICES fake devices (sharding as on N accelerators), or
# PROCESSES processes on loopback (the multi-host path: gloo collectives, one coordinator).
#   DEVICES=8 launch/local_cpu.sh                        # FSDP: add --config.mesh.fsdp=4
#   PROCESSES=2 DEVICES=4 launch/local_cpu.sh            # 2 processes x 4 devices
# DRY_RUN=1 only prints. Extra arguments go to dino_jax.train.
set -euo pipefail
source "$(dirname "$0")/common.sh"
CONFIG=${CONFIG:-configs/dino_vits16.py:tiny}
WORKDIR=${WORKDIR:-runs/local_cpu}
DEVICES=${DEVICES:-8}
PROCESSES=${PROCESSES:-1}
PORT=${PORT:-$((20000 + RANDOM % 20000))}
require_int DEVICES PROCESSES PORT
export XLA_FLAGS="--xla_force_host_platform_device_count=$DEVICES" JAX_PLATFORMS=cpu
train=(python -m dino_jax.train --config "$CONFIG" --workdir "$WORKDIR")
if [[ "$PROCESSES" == 1 ]]; then
  run "${train[@]}" --config.data.source=fashion_mnist_demo "$@"
  exit
fi
pids=()
for ((i = 0; i < PROCESSES; i++)); do
  process=("${train[@]}" --config.data.source=fashion_mnist_demo --distributed --coordinator_address="localhost:$PORT"
           --num_processes="$PROCESSES" --process_id="$i" "$@")
  show "${process[@]}"  # printed here, not in the background job, so that the lines never mix
  if ! dry_run; then
    "${process[@]}" &
    pids+=($!)
  fi
done
if dry_run; then exit; fi
for pid in "${pids[@]}"; do wait "$pid"; done
