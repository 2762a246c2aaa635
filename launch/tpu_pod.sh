#!/usr/bin/env bash
# Cloud TPU VM pod slice: create | setup | run | resume | ssh | delete.
#   TPU=my-pod ZONE=us-central2-b TYPE=v4-32 WORKDIR=/shared/run CONFIG=configs/dinov2_vitl14.py \
#     launch/tpu_pod.sh create      # then: setup, run (and resume after a preemption: same command)
#   launch/tpu_pod.sh run --config.model.dtype=bfloat16 '--config.name=my run'   # extra trainer flags
# Extra trainer flags: the arguments after run/resume, each passed as one word, as typed.
# ARGS="--a=1 --b=2" also works: it is split at whitespace only (no quotes, no globbing) and
# goes before the arguments; a flag whose value has a space must be an argument instead.
# Every value reaches the workers' trainer literally: the remote command string is built with
# quote_words (common.sh), so nothing in CONFIG, WORKDIR or the flags is expanded or run there.
# Relative paths are relative to ~/dino_jax on each worker.
# Uses your own gcloud login and project; no credentials live here. DRY_RUN=1 only prints.
set -euo pipefail
source "$(dirname "$0")/common.sh"
: "${TPU:?set TPU (the TPU VM name)}" "${ZONE:?set ZONE}"
TYPE=${TYPE:-v4-32}
RUNTIME=${RUNTIME:-tpu-ubuntu2204-base}
REPO_URL=${REPO_URL:-https://github.com/YOUR_ORG/dino_jax.git}
CONFIG=${CONFIG:-configs/dinov2_vitl14.py}
WORKDIR=${WORKDIR:-}
ARGS=${ARGS:-}
# ssh_all COMMAND: run the shell command string COMMAND on every worker (also printed as is).
ssh_all() {
  printf '# each worker runs: %s\n' "$1"
  run gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command="$1"
}
usage() { echo "usage: $0 create|setup|run|resume|ssh|delete (only run and resume take arguments)" >&2; exit 2; }

action=${1:-}
shift || true
if [[ $# -gt 0 && "$action" != run && "$action" != resume ]]; then usage; fi
case "$action" in
  create) run gcloud compute tpus tpu-vm create "$TPU" --zone="$ZONE" --accelerator-type="$TYPE" --version="$RUNTIME" ;;
  setup)  ssh_all "git clone $(quote_words "$REPO_URL") dino_jax || git -C dino_jax pull; cd dino_jax && python3 -m venv .venv && .venv/bin/pip install -e . 'jax[tpu]'" ;;
  run|resume)
    : "${WORKDIR:?set WORKDIR (a folder all workers see: NFS or a gcsfuse mount)}"
    if [[ "$ARGS" == *[\'\"\\]* ]]; then
      echo "error: ARGS is split at whitespace only, so its quotes and backslashes would reach the" \
           "trainer as they are; give such flags as arguments: $0 $action '--config.name=my run'" >&2
      exit 2
    fi
    train=(.venv/bin/python -m dino_jax.train --distributed --config "$CONFIG" --workdir "$WORKDIR")
    set -f  # ARGS is split at whitespace (on purpose), without globbing
    # shellcheck disable=SC2206
    train+=($ARGS)
    set +f
    # One process per worker; jax.distributed.initialize() finds the others. The same command resumes.
    ssh_all "cd dino_jax && $(quote_words "${train[@]}" "$@")" ;;
  ssh)    run gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker="${WORKER:-0}" ;;
  delete) run gcloud compute tpus tpu-vm delete "$TPU" --zone="$ZONE" ;;
  *) usage ;;
esac
