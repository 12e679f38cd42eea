#!/usr/bin/env bash
# The GPU measurements issue #3 still needs, as ONE command that fits a 10-minute device call on
# an H100: every step has its own time limit, and no step starts past DEADLINE_S (540 s) of the
# whole, so one hang cannot eat the rest and the whole stays under the device tool's 600 s.
# Run from the repository root on a machine whose python3 has jax[cuda], flax, transformers:
#
#     TREES="gpu_ab/v0 ." bash bench/gpu_checks.sh    # logs, JSON, decode HLO under $OUT
#
# TREES lists source trees to A/B (each a folder holding a `rlver_jax/` package, e.g. an older
# commit's `git archive HEAD rlver_jax | tar -x -C gpu_ab/v0`); the last one is the candidate.
# Every tree runs the same batch-1 decode (unrolled, fp32 and bf16: the target still missed
# there); then the candidate runs batches 8 and 32, the batch-1 decode under the profiler (the
# costliest kernels per step), the first tree batches 8 and 32 (the baseline for them), and the
# candidate with XLA's command buffers over the whole decode loop. Each sample run also dumps
# the decode program's optimized HLO (`$OUT/hlo_<step>/`), to count its kernels offline.
#
# SMOKE=1 runs the same steps on minuscule models (a check of this script on a CPU).
set -u
OUT=${OUT:-bench/results/gpu-$(date +%F)}
OUT=$(mkdir -p "$OUT" && cd "$OUT" && pwd)
ROOT=$(pwd)
read -r -a TREES <<<"${TREES:-.}"
DEADLINE_S=${DEADLINE_S:-540}
SAMPLE=(bench sample --weights random --skip-torch --repeats 3 --unroll-decode on)
SHAPE=()
if [[ ${SMOKE:-0} == 1 ]]; then
  SHAPE=(--model tiny --prompt-len 8 --new-tokens 4)
fi
CMDBUF=--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL

run() {  # run NAME LIMIT_S TREE [ENV=VALUE...] -- ARGS...
  local name=$1 limit=$2 tree=$3 envs=() left
  shift 3
  while [[ $1 != -- ]]; do envs+=("$1"); shift; done
  shift
  left=$((DEADLINE_S - SECONDS))
  if ((left < 30)); then
    echo "== $name: skipped, ${SECONDS}s spent" | tee -a "$OUT/commands.txt"
    return
  fi
  ((limit > left)) && limit=$left
  local dump="--xla_dump_to=$OUT/hlo_$name --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*decode.*"
  echo "== $name (tree $tree, limit ${limit}s): ${envs[*]} rlver-jax $*" | tee -a "$OUT/commands.txt"
  (cd "$ROOT/$tree" && env XLA_FLAGS="${XLA_EXTRA:-} $dump" "${envs[@]}" timeout "$limit" \
    python3 -m rlver_jax.cli "$@" "${SHAPE[@]}" --json "$OUT/$name.json" >"$OUT/$name.log" 2>&1)
  echo "   exit $? after ${SECONDS}s total" | tee -a "$OUT/commands.txt"
  sed -n '/^summary/,$p' "$OUT/$name.log" | grep -E "^ +jax"
  # keep only the decode program's optimized HLO, compressed
  find "$OUT/hlo_$name" -type f ! -name "*decode*after_optimizations.txt" -delete 2>/dev/null
  find "$OUT/hlo_$name" -type d -empty -delete 2>/dev/null
  gzip -qr "$OUT/hlo_$name" 2>/dev/null
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/gpu.txt" 2>&1
python3 -c "import jax, jaxlib; print(jax.__version__, jaxlib.__version__, jax.devices())" \
  >>"$OUT/gpu.txt" 2>&1
i=0
for tree in "${TREES[@]}"; do
  i=$((i + 1))
  run "b1_$i" 100 "$tree" -- "${SAMPLE[@]}" --batches 1 --dtypes float32,bfloat16
done
last=${TREES[-1]}
run b8_32_last 110 "$last" -- "${SAMPLE[@]}" --batches 8,32 --dtypes float32,bfloat16
run b1_last_profile 80 "$last" -- "${SAMPLE[@]}" --batches 1 --dtypes float32 --profile
run b8_32_first 110 "${TREES[0]}" -- "${SAMPLE[@]}" --batches 8,32 --dtypes float32,bfloat16
XLA_EXTRA=$CMDBUF run b1_last_cmdbuf 80 "$last" -- "${SAMPLE[@]}" --batches 1 --dtypes float32
echo "trees: ${TREES[*]}" >>"$OUT/commands.txt"
