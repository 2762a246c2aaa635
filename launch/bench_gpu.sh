#!/usr/bin/env bash
# The GPU speed figures of docs/performance.md on one GPU (bfloat16), one mode per argument, in the order given:
#   against   the JAX step vs the same step in PyTorch eager (bench --against_pytorch)
#   bench     the full bench step (augmentation included): images/s, MFU, memory
#   noscan    the same with the blocks unrolled (model.scan=False)
#   max_batch the largest per-device batch that fits the GPU (bench --find_max_batch, compiles only)
#   CONFIG=configs/dinov2_vitl14.py BATCH=32 OUT=runs/bench launch/bench_gpu.sh against bench max_batch
# ATTENTION=cudnn for cuDNN's fused attention (odd token counts padded to even). PROFILE=DIR has
# `bench` trace one more step into DIR and print the XLA ops that took the most time. Each mode
# appends a JSON line to $OUT/bench_gpu.jsonl. Needs jax with CUDA, and torch + timm for `against`
# (pip install -e '.[test]'). DRY_RUN=1 only prints.
set -uo pipefail
source "$(dirname "$0")/common.sh"
CONFIG=${CONFIG:-configs/dinov2_vitl14.py}
BATCH=${BATCH:-32}
OUT=${OUT:-runs/bench}
STEPS=${STEPS:-5}
ATTENTION=${ATTENTION:-xla}
PYTHON=${PYTHON:-python3}
dry_run || mkdir -p "$OUT"
bench() {  # bench VAR=value... -- bench flags...
  local env=()
  while [[ $1 != -- ]]; do env+=("$1"); shift; done
  shift
  run env "${env[@]}" "$PYTHON" -m dino_jax.bench --config "$CONFIG" --config.batch_size="$BATCH" \
      --config.model.dtype=bfloat16 --config.model.attention="$ATTENTION" --json "$OUT/bench_gpu.jsonl" "$@"
}
full_gpu=XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
status=0
for mode in "$@"; do
  case $mode in
    # PyTorch needs memory beside JAX's: no preallocation.
    against) bench XLA_PYTHON_CLIENT_PREALLOCATE=false -- --against_pytorch --steps "$STEPS" --warmup 2 ;;
    bench) bench "$full_gpu" -- --steps "$STEPS" --warmup 2 ${PROFILE:+--profile_dir "$PROFILE"} ;;
    noscan) bench "$full_gpu" -- --config.model.scan=False --steps "$STEPS" --warmup 2 ;;
    # The search compiles only: XLA's autotuning would add minutes per try. BATCH is not used.
    max_batch) bench "$full_gpu" XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_autotune_level=0" -- --find_max_batch ;;
    *) echo "error: unknown mode $mode (against, bench, noscan, max_batch)" >&2; exit 2 ;;
  esac || status=1
done
exit $status
