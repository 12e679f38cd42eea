#!/usr/bin/env bash
# Runs ON every TPU VM worker (tpu/launch.sh starts it with --worker=all): `rlver-jax train` in
# the background, log in DIR/train.log, pid in DIR/train.pid (tpu/stop.sh signals it).
# RLVER_COORDINATOR=auto (set by launch.sh on multi-host slices) passes through to the trainer.
#   [RLVER_COORDINATOR=auto] bash tpu/worker_train.sh [--dry-run] DIR CONFIG OUTPUT [key=value ...]
set -euo pipefail
dry=0
if [ "${1:-}" = --dry-run ]; then dry=1; shift; fi
if [ $# -lt 3 ]; then
  echo "usage: worker_train.sh [--dry-run] DIR CONFIG OUTPUT [key=value ...]" >&2
  exit 2
fi
dir="$1" config="$2" output="$3"
shift 3
cd "$dir"
cmd=(.venv/bin/rlver-jax train --config "$config" "output_dir=$output" "$@")
if [ "$dry" = 1 ]; then
  echo "RLVER_COORDINATOR=${RLVER_COORDINATOR:-} nohup ${cmd[*]} > $dir/train.log 2>&1 &"
  exit 0
fi
if [ -f train.pid ] && kill -0 "$(cat train.pid)" 2>/dev/null; then
  echo "$(hostname): already running (pid $(cat train.pid)); tpu/stop.sh first" >&2
  exit 1
fi
nohup "${cmd[@]}" >train.log 2>&1 </dev/null &
echo $! >train.pid
echo "$(hostname): rlver-jax train started (pid $!), log $dir/train.log"
