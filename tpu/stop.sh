#!/usr/bin/env bash
# Stop training on every worker (SIGINT to the pid tpu/worker_train.sh recorded); the TPU VM
# stays up and checkpoints stay in gs://, so tpu/launch.sh resumes.
#   tpu/stop.sh --name rl --zone us-east5-a --accelerator v5p-32 [--dry-run]
# Options: tpu/common.sh.
source "$(dirname "$0")/common.sh"
parse_args "$@"
d="$REMOTE_DIR"
ssh_cmd all "if [ -f $d/train.pid ]; then kill -INT \"\$(cat $d/train.pid)\" || true; fi"
