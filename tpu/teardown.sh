#!/usr/bin/env bash
# Delete the TPU VM (every host). Outputs in gs:// are kept.
#   tpu/teardown.sh --name rl --zone us-east5-a --accelerator v5p-32 [--dry-run]
# Options: tpu/common.sh.
source "$(dirname "$0")/common.sh"
parse_args "$@"
run_cmd gcloud compute tpus tpu-vm delete "$NAME" "${WHERE[@]}" --quiet
