#!/usr/bin/env bash
# Launch `rlver-jax train` on several GPU nodes (jax's CUDA build: ./install.sh cuda on each).
#
# ssh mode: ONE process per node owning all of its GPUs; process i gets
#     RLVER_COORDINATOR=<first host>:<port> RLVER_NUM_PROCESSES=<n hosts> RLVER_PROCESS_ID=i
#   tpu/gpu_multinode.sh --hosts node0,node1 --config configs/X.yaml --output /shared/runs/x \
#     [--port 29500] [--remote-dir ~/rlver_jax] [--dry-run] [key=value ...]
#
# SLURM mode (run inside an sbatch allocation): ONE process per GPU. jax.distributed reads the
# SLURM_* variables itself (RLVER_COORDINATOR=auto) and, under SLURM, binds each process to the
# GPU of its local rank (local_device_ids=[SLURM_LOCALID]); every task must therefore SEE all
# the node's GPUs (no --gpus-per-task / GPU binding).
#   tpu/gpu_multinode.sh --slurm --nodes 2 --gpus-per-node 8 --config configs/X.yaml \
#     --output /shared/runs/x [--dry-run] [key=value ...]
#
# --output must be visible from every node (a shared filesystem or gs://): each process writes
# its own shards of every checkpoint. --dry-run prints the exact commands.
set -euo pipefail
export LC_ALL=C
source "$(dirname "$0")/common.sh"

HOSTS_CSV="" PORT=29500 SLURM=0 NODES="" GPUS=""
REMOTE_DIR="~/rlver_jax"
while [ $# -gt 0 ]; do
  opt="$1"
  case "$opt" in
    --dry-run) DRY_RUN=1; shift; continue ;;
    --slurm) SLURM=1; shift; continue ;;
    --*=*) val="${opt#*=}"; opt="${opt%%=*}"; shift ;;
    --*) [ $# -ge 2 ] || die "$opt needs a value"; val="$2"; shift 2 ;;
    *) OVERRIDES+=("$opt"); shift; continue ;;
  esac
  case "$opt" in
    --hosts) HOSTS_CSV="$val" ;;
    --port) PORT="$val" ;;
    --nodes) NODES="$val" ;;
    --gpus-per-node) GPUS="$val" ;;
    --remote-dir) REMOTE_DIR="$val" ;;
    --config) CONFIG="$val" ;;
    --output) OUTPUT="$val" ;;
    *) die "unknown option $opt" ;;
  esac
done
[ -n "$CONFIG" ] && [ -n "$OUTPUT" ] || die "needs --config and --output (a shared path)"
[[ "$REMOTE_DIR" =~ ^[~A-Za-z0-9_./-]+$ ]] || die "remote_dir: letters, digits, ~ _ . / - only"

train="$REMOTE_DIR/.venv/bin/rlver-jax train --config $(q "$CONFIG") $(q "output_dir=$OUTPUT")"
for o in ${OVERRIDES[@]+"${OVERRIDES[@]}"}; do train+=" $(q "$o")"; done

if [ "$SLURM" = 1 ]; then
  [ -n "$NODES" ] && [ -n "$GPUS" ] || die "--slurm needs --nodes and --gpus-per-node"
  run_cmd srun "--nodes=$NODES" "--ntasks-per-node=$GPUS" "--gpus-per-node=$GPUS" \
    --kill-on-bad-exit=1 bash -c "cd $REMOTE_DIR && RLVER_COORDINATOR=auto exec $train"
  exit 0
fi

[ -n "$HOSTS_CSV" ] || die "needs --hosts h0,h1,... (or --slurm)"
IFS=, read -r -a HOST_LIST <<<"$HOSTS_CSV"
n=${#HOST_LIST[@]}
coordinator="${HOST_LIST[0]}:$PORT"
for i in "${!HOST_LIST[@]}"; do
  env="RLVER_COORDINATOR=$coordinator RLVER_NUM_PROCESSES=$n RLVER_PROCESS_ID=$i"
  run_cmd ssh "${HOST_LIST[$i]}" "cd $REMOTE_DIR && $env nohup $train > train.log 2>&1 < /dev/null & echo \$! > $REMOTE_DIR/train.pid"
done
