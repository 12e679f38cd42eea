#!/usr/bin/env bash
# Create a Cloud TPU VM: one host (v6e-8, v5p-8) or a whole pod slice (v5p-32, v6e-16), all
# hosts at once.
#   tpu/create.sh --name rl --zone us-east5-a --accelerator v5p-32 [--project P] [--spot] [--dry-run]
# Options: tpu/common.sh.
source "$(dirname "$0")/common.sh"
parse_args "$@"
echo "# $ACCELERATOR: $CHIPS chips on $HOSTS host(s), runtime $VERSION" >&2
cmd=(gcloud compute tpus tpu-vm create "$NAME" "${WHERE[@]}" "--accelerator-type=$ACCELERATOR"
  "--version=$VERSION")
if [ "$SPOT" = 1 ]; then cmd+=(--spot); fi
run_cmd "${cmd[@]}"
