#!/usr/bin/env bash
# Follow the training log of one worker (default 0: process 0 prints the metrics).
#   tpu/logs.sh --name rl --zone us-east5-a --accelerator v5p-32 [--worker 1] [--dry-run]
# Options: tpu/common.sh.
source "$(dirname "$0")/common.sh"
parse_args "$@"
ssh_cmd "$WORKER" "tail -n 200 -F $REMOTE_DIR/train.log"
