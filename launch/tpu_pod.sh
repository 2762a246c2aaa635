#!/usr/bin/env bash
# Cloud TPU VM pod slice: create | setup | run | resume | ssh | delete.
#   TPU=my-pod ZONE=us-central2-b TYPE=v4-32 WORKDIR=/shared/run CONFIG=configs/dinov2_vitl14.py \
#     launch/tpu_pod.sh create      # then: setup, run (and resume after a preemption: same command)
# Uses your own gcloud login and project; no credentials live here. DRY_RUN=1 only prints.
set -euo pipefail
source "$(dirname "$0")/common.sh"
: "${TPU:?set TPU (the TPU VM name)}" "${ZONE:?set ZONE}"
TYPE=${TYPE:-v4-32}
RUNTIME=${RUNTIME:-tpu-ubuntu2204-base}
REPO_URL=${REPO_URL:-https://github.com/YOUR_ORG/dino_jax.git}
CONFIG=${CONFIG:-configs/dinov2_vitl14.py}
WORKDIR=${WORKDIR:-}
ssh_all() { run gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command="$1"; }
case "${1:-}" in
  create) run gcloud compute tpus tpu-vm create "$TPU" --zone="$ZONE" --accelerator-type="$TYPE" --version="$RUNTIME" ;;
  setup)  ssh_all "git clone $REPO_URL dino_jax || git -C dino_jax pull; cd dino_jax && python3 -m venv .venv && .venv/bin/pip install -e . 'jax[tpu]'" ;;
  run|resume)
    : "${WORKDIR:?set WORKDIR (a folder all workers see: NFS or a gcsfuse mount)}"
    # One process per worker; jax.distributed.initialize() finds the others. The same command resumes.
    ssh_all "cd dino_jax && .venv/bin/python -m dino_jax.train --distributed --config $CONFIG --workdir $WORKDIR ${ARGS:-}" ;;
  ssh)    run gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker="${WORKER:-0}" ;;
  delete) run gcloud compute tpus tpu-vm delete "$TPU" --zone="$ZONE" ;;
  *) echo "usage: $0 create|setup|run|resume|ssh|delete" >&2; exit 2 ;;
esac
