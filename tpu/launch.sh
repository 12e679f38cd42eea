#!/usr/bin/env bash
# Start training on EVERY worker (one JAX process per host; jax.distributed detects the slice
# through RLVER_COORDINATOR=auto on multi-host slices). Checkpoints and metrics go to --output,
# which must be gs:// (the hosts share no disk).
#   tpu/launch.sh --name rl --zone us-east5-a --accelerator v5p-32 \
#     --config configs/qwen2.5-7b_ppo_think_v5p.yaml --output gs://BUCKET/runs/qwen7b [key=value ...] [--dry-run]
# Options: tpu/common.sh.
source "$(dirname "$0")/common.sh"
parse_args "$@"
[ -n "$CONFIG" ] && [ -n "$OUTPUT" ] || die "launch needs --config and --output gs://..."
[[ "$OUTPUT" == gs://* ]] || die "output '$OUTPUT': a pod's hosts share no disk; use a gs:// path"
env=""
if [ "$HOSTS" -gt 1 ]; then env="RLVER_COORDINATOR=auto "; fi
args="$(q "$CONFIG") $(q "$OUTPUT")"
for o in ${OVERRIDES[@]+"${OVERRIDES[@]}"}; do args+=" $(q "$o")"; done
ssh_cmd all "${env}bash $REMOTE_DIR/tpu/worker_train.sh $REMOTE_DIR $args"
