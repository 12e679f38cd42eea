#!/usr/bin/env bash
# The GPU measurements issue #3 still needs, as ONE command that fits a 10-minute device call on
# an H100: every step has its own time limit, and no step starts past DEADLINE_S (540 s) of the
# whole, so one hang cannot eat the rest and the whole stays under the device tool's 600 s.
# Run from the repository root on a machine whose python3 has jax[cuda], flax, transformers:
#
#     bash bench/gpu_checks.sh        # logs, JSON and the decode programs' HLO under $OUT
#
# The batch-1 target (within 2x of the bandwidth bound) is what the steps measure, in order of
# need: the fused Pallas decode step (`--decode pallas`, `kernels.gpu.decode`) at batch 1;
# XLA's unrolled step at batch 1 (the baseline, same machine); the fused step with command
# buffers over every op (in case the default set leaves its custom calls out); the fused step
# under the profiler without command buffers (with them the whole step is one op; here each
# kernel is its own); at batch 8 (the most it fuses, `gpu_decode.MAX_BATCH`); with smaller
# blocks (twice the programs per kernel). Each run also dumps the decode program's optimized
# HLO (`$OUT/hlo_<step>/`), to count its kernels offline. If the fused step fails to compile,
# its log holds Triton's error; `bench/triton_check.py` compiles the same kernels on a CPU.
#
# SMOKE=1 runs the same steps on minuscule models (a check of this script on a CPU, where the
# fused kernels run in Pallas' interpret mode).
set -u
# XLA's command buffers (CUDA graphs) over every kind of op, the while loop included
CMDBUF=--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL
OUT=${OUT:-bench/results/gpu-$(date +%F)}
OUT=$(mkdir -p "$OUT" && cd "$OUT" && pwd)
DEADLINE_S=${DEADLINE_S:-540}
SAMPLE=(bench sample --weights random --skip-torch --repeats 3 --decode unrolled)
SHAPE=()
if [[ ${SMOKE:-0} == 1 ]]; then
  SHAPE=(--model tiny --prompt-len 8 --new-tokens 4)
fi

run() {  # run NAME LIMIT_S ARGS...
  local name=$1 limit=$2 left
  shift 2
  left=$((DEADLINE_S - SECONDS))
  if ((left < 30)); then
    echo "== $name: skipped, ${SECONDS}s spent" | tee -a "$OUT/commands.txt"
    return
  fi
  ((limit > left)) && limit=$left
  local dump="--xla_dump_to=$OUT/hlo_$name --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*decode.*"
  echo "== $name (limit ${limit}s): rlver-jax $*" | tee -a "$OUT/commands.txt"
  env XLA_FLAGS="${XLA_EXTRA:-} $dump" timeout "$limit" \
    python3 -m rlver_jax.cli.main "$@" "${SHAPE[@]}" --json "$OUT/$name.json" >"$OUT/$name.log" 2>&1
  echo "   exit $? after ${SECONDS}s total" | tee -a "$OUT/commands.txt"
  sed -n '/^summary/,$p' "$OUT/$name.log" | grep -E "^ +jax"
  tail -n 5 "$OUT/$name.log" | grep -iE "error|exception" | head -n 3
  # keep only the decode program's optimized HLO, compressed
  find "$OUT/hlo_$name" -type f ! -name "*decode*after_optimizations.txt" -delete 2>/dev/null
  find "$OUT/hlo_$name" -type d -empty -delete 2>/dev/null
  gzip -qr "$OUT/hlo_$name" 2>/dev/null
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/gpu.txt" 2>&1
python3 -c "import jax, jaxlib; print(jax.__version__, jaxlib.__version__, jax.devices())" \
  >>"$OUT/gpu.txt" 2>&1
git log --oneline -1 >>"$OUT/gpu.txt" 2>&1
run b1_pallas 150 "${SAMPLE[@]}" --decode pallas --batches 1 --dtypes float32,bfloat16
run b1_xla 100 "${SAMPLE[@]}" --batches 1 --dtypes float32,bfloat16
XLA_EXTRA=$CMDBUF run b1_pallas_cmdbuf 80 "${SAMPLE[@]}" --decode pallas --batches 1 \
  --dtypes float32
XLA_EXTRA=--xla_gpu_enable_command_buffer= run b1_pallas_profile 80 "${SAMPLE[@]}" \
  --decode pallas --batches 1 --dtypes float32 --profile
run b8_pallas 100 "${SAMPLE[@]}" --decode pallas --batches 8 --dtypes float32,bfloat16
run b1_pallas_small_blocks 90 "${SAMPLE[@]}" --decode pallas --batches 1 \
  --dtypes float32,bfloat16 --pallas-blocks qkv_rows=4,out_rows=8,mlp_rows=8,down_rows=4,slots=16
