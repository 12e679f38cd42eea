#!/usr/bin/env bash
# Install the project on EVERY worker of a TPU VM (--worker=all): clone --repo at --ref, or copy
# this working tree (tar + scp), then tpu/worker_setup.sh on each host (Python >= 3.11,
# ./install.sh tpu, gcsfs for gs:// output).
#   tpu/setup.sh --name rl --zone us-east5-a --accelerator v5p-32 [--repo URL --ref main] [--dry-run]
# Options: tpu/common.sh.
source "$(dirname "$0")/common.sh"
parse_args "$@"
if [ -n "$REPO" ]; then
  d="$REMOTE_DIR"
  update="git -C $d fetch --depth 1 origin $(q "$REF") && git -C $d checkout -f FETCH_HEAD"
  clone="git clone --depth 1 --branch $(q "$REF") $(q "$REPO") $d"
  ssh_cmd all "if [ -d $d/.git ]; then $update; else $clone; fi"
else
  root="$(q "$REPO_ROOT")" # tracked + untracked files, minus .gitignore'd ones
  run_cmd bash -c "git -C $root ls-files -z -co --exclude-standard | tar -C $root --null -T - --ignore-failed-read -czf $TARBALL"
  run_cmd gcloud compute tpus tpu-vm scp "$TARBALL" "$NAME:$TARBALL" "${WHERE[@]}" --worker=all
  ssh_cmd all "mkdir -p $REMOTE_DIR && tar xzf $TARBALL -C $REMOTE_DIR"
fi
ssh_cmd all "bash $REMOTE_DIR/tpu/worker_setup.sh $REMOTE_DIR"
