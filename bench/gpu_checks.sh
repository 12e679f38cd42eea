#!/usr/bin/env bash
# The GPU measurements issue #3 still needs, as ONE command that fits a 10-minute device call on
# an H100 (each step has its own time limit, 560 s in all, so one hang cannot eat the rest and
# the whole stays under the device tool's 600 s per call).
# Run from the repository root on a machine whose python3 has jax[cuda], flax, transformers:
#
#     bash bench/gpu_checks.sh            # logs + JSON under $OUT (the device tool's folder)
#
# What it measures, at batch 1 (the target still missed there), float32 and bfloat16:
#   1 scan          the GPU default: decode scans the layers (dynamic slices of stacked weights)
#   2 scan_dsf      the same with XLA's dynamic-slice fusion, so cuBLAS reads each layer's
#                   weights in place instead of from a copied slice
#   3 loop          scan_layers off: a Python loop over static slices of the stacked weights
#   4 loop_dsf      3 with dynamic-slice fusion
#   5 unrolled      decode_step over per-layer weight copies (fastest so far: 0.96 ms fp32 b1)
#   6 train_mb8     the learner at micro-batch 8 now that attention runs in query blocks
#                   (micro-batch 8 ran out of memory before them; MFU was 14.0% at micro-batch 2)
#
# SMOKE=1 runs the same steps on minuscule models (a check of this script on a CPU).
set -u
OUT=${OUT:-bench/results/gpu-$(date +%F)}
mkdir -p "$OUT"
SAMPLE=(bench sample --weights random --batches 1 --skip-torch --repeats 3)
TRAIN=(bench train --model qwen2.5-0.5b --dtypes bfloat16 --batch 8 --micro-batch 8 --seq-len 2048)
if [[ ${SMOKE:-0} == 1 ]]; then
  SAMPLE+=(--model tiny --prompt-len 8 --new-tokens 4 --dtypes float32)
  TRAIN=(bench train --tiny --dtypes float32 --batch 2 --seq-len 32)
fi
DSF=--xla_gpu_enable_dynamic_slice_fusion=true

run() {  # run NAME LIMIT_S [ENV=VALUE...] -- ARGS...
  local name=$1 limit=$2 envs=()
  shift 2
  while [[ $1 != -- ]]; do envs+=("$1"); shift; done
  shift
  echo "== $name: ${envs[*]} rlver-jax $*" | tee -a "$OUT/commands.txt"
  env "${envs[@]}" timeout "$limit" python3 -m rlver_jax.cli "$@" >"$OUT/$name.log" 2>&1
  echo "   exit $? after ${SECONDS}s total" | tee -a "$OUT/commands.txt"
  # the summary table of a sample run, the result rows and verdicts of a train run
  sed -n '/^summary/,$p' "$OUT/$name.log" | grep -E "^ +jax"
  grep -E "^ +[a-z0-9.-]+ +\| +(float32|bfloat16)|target" "$OUT/$name.log" | grep -vE "^ +jax"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/gpu.txt" 2>&1
python3 -c "import jax, jaxlib; print(jax.__version__, jaxlib.__version__, jax.devices())" \
  >>"$OUT/gpu.txt" 2>&1
run 1_scan 80 -- "${SAMPLE[@]}" --unroll-decode off --json "$OUT/1_scan.json"
run 2_scan_dsf 80 XLA_FLAGS=$DSF -- "${SAMPLE[@]}" --unroll-decode off --json "$OUT/2_scan_dsf.json"
run 3_loop 100 -- "${SAMPLE[@]}" --unroll-decode off --scan-layers off --json "$OUT/3_loop.json"
run 4_loop_dsf 100 XLA_FLAGS=$DSF -- "${SAMPLE[@]}" --unroll-decode off --scan-layers off \
  --json "$OUT/4_loop_dsf.json"
run 5_unrolled 80 -- "${SAMPLE[@]}" --unroll-decode on --json "$OUT/5_unrolled.json"
run 6_train_mb8 120 -- "${TRAIN[@]}" --steps 5 --json "$OUT/6_train_mb8.json"
