# Shared by tpu/{create,setup,launch,logs,stop,teardown}.sh (sourced, not run).
#
# Options (each also read from the environment variable in brackets):
#   --name NAME            TPU VM name                       [TPU_NAME]
#   --zone ZONE            e.g. us-east5-a                   [TPU_ZONE]
#   --accelerator TYPE     e.g. v5p-32, v6e-16, v6e-8        [TPU_ACCELERATOR]
#   --project PROJECT      GCP project (default: gcloud's)   [TPU_PROJECT]
#   --runtime-version V    TPU VM image (default: the family's, see tpu_topology)
#   --spot                 spot capacity (create)
#   --repo URL --ref REF   clone this git repo on the workers (setup; default: copy this tree)
#   --remote-dir DIR       where the project lives on the workers (default ~/rlver_jax)
#   --config FILE --output gs://...   (launch)   --worker N (logs, default 0)
#   --dry-run              print the exact commands instead of running them
# Other arguments (key=value) are config overrides (launch).
#
# The commands are the same, character for character, as `python3 tpu/pod.py <action> ...`
# prints (tests/test_tpu_scripts.py checks it); tpu/pod.py documents the topology rules.

set -euo pipefail
export LC_ALL=C
TPU_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
REPO_ROOT="$(cd "$TPU_DIR/.." && pwd -P)"
TARBALL=/tmp/rlver_jax_src.tar.gz

NAME="${TPU_NAME:-}"
ZONE="${TPU_ZONE:-}"
ACCELERATOR="${TPU_ACCELERATOR:-}"
PROJECT="${TPU_PROJECT:-}"
RUNTIME_VERSION=""
SPOT=0
REPO=""
REF=main
REMOTE_DIR="~/rlver_jax"
CONFIG=""
OUTPUT=""
WORKER=0
DRY_RUN=0
OVERRIDES=()

die() { echo "error: $*" >&2; exit 2; }

# shlex.quote: unchanged if only [A-Za-z0-9_@%+=:,./-], else single-quoted.
q() {
  local s="$1"
  if [ -z "$s" ]; then printf "''"; return; fi
  if [[ "$s" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then printf '%s' "$s"; return; fi
  printf "'%s'" "${s//\'/\'\"\'\"\'}"
}

print_cmd() {
  local out=() a
  for a in "$@"; do out+=("$(q "$a")"); done
  echo "${out[*]}"
}

# Print (--dry-run) or echo to stderr and execute.
run_cmd() {
  if [ "$DRY_RUN" = 1 ]; then
    print_cmd "$@"
  else
    echo "+ $(print_cmd "$@")" >&2
    "$@"
  fi
}

parse_args() {
  while [ $# -gt 0 ]; do
    local opt="$1" val=""
    case "$opt" in
      --*=*) val="${opt#*=}"; opt="${opt%%=*}"; shift ;;
      --spot | --dry-run) shift ;;
      --*) [ $# -ge 2 ] || die "$opt needs a value"; val="$2"; shift 2 ;;
      *) OVERRIDES+=("$opt"); shift; continue ;;
    esac
    case "$opt" in
      --name) NAME="$val" ;;
      --zone) ZONE="$val" ;;
      --accelerator) ACCELERATOR="$val" ;;
      --project) PROJECT="$val" ;;
      --runtime-version) RUNTIME_VERSION="$val" ;;
      --spot) SPOT=1 ;;
      --repo) REPO="$val" ;;
      --ref) REF="$val" ;;
      --remote-dir) REMOTE_DIR="$val" ;;
      --config) CONFIG="$val" ;;
      --output) OUTPUT="$val" ;;
      --worker) WORKER="$val" ;;
      --dry-run) DRY_RUN=1 ;;
      *) die "unknown option $opt (see tpu/common.sh)" ;;
    esac
  done
  [ -n "$NAME" ] || die "pod name is required (--name)"
  [ -n "$ZONE" ] || die "pod zone is required (--zone)"
  [ -n "$ACCELERATOR" ] || die "pod accelerator is required (--accelerator)"
  [[ "$REMOTE_DIR" =~ ^[~A-Za-z0-9_./-]+$ ]] ||
    die "remote_dir '$REMOTE_DIR': use letters, digits, ~ _ . / - only"
  tpu_topology
  WHERE=("--zone=$ZONE")
  if [ -n "$PROJECT" ]; then WHERE+=("--project=$PROJECT"); fi
}

# FAMILY, CHIPS, HOSTS, DEFAULT_RUNTIME from ACCELERATOR (rules: tpu/pod.py docstring).
tpu_topology() {
  [[ "$ACCELERATOR" =~ ^(v[0-9]+[a-z]*)-([0-9]+)$ ]] ||
    die "accelerator '$ACCELERATOR': expected <family>-<count>, e.g. v5p-32 or v6e-16"
  FAMILY="${BASH_REMATCH[1]}"
  local count="${BASH_REMATCH[2]}" cores single per
  if [ "$FAMILY" = v5e ]; then FAMILY=v5litepod; fi
  case "$FAMILY" in
    v2 | v3 | v4) cores=2 single=4 per=4 DEFAULT_RUNTIME=tpu-ubuntu2204-base ;;
    v5p) cores=2 single=4 per=4 DEFAULT_RUNTIME=v2-alpha-tpuv5 ;;
    v5litepod) cores=1 single=8 per=4 DEFAULT_RUNTIME=v2-alpha-tpuv5-lite ;;
    v6e) cores=1 single=8 per=4 DEFAULT_RUNTIME=v2-alpha-tpuv6e ;;
    *) die "accelerator '$ACCELERATOR': unknown family" ;;
  esac
  if [ "$count" -lt 1 ] || [ $((count % cores)) -ne 0 ]; then
    die "accelerator '$ACCELERATOR': $FAMILY counts $cores cores per chip"
  fi
  CHIPS=$((count / cores))
  if [ "$CHIPS" -le "$single" ]; then
    HOSTS=1
  elif [ $((CHIPS % per)) -ne 0 ]; then
    die "accelerator '$ACCELERATOR': $CHIPS chips do not fill $per-chip hosts"
  else
    HOSTS=$((CHIPS / per))
  fi
  VERSION="${RUNTIME_VERSION:-$DEFAULT_RUNTIME}"
}

# gcloud ... ssh NAME --worker=W --command=REMOTE
ssh_cmd() {
  local worker="$1" remote="$2"
  run_cmd gcloud compute tpus tpu-vm ssh "$NAME" "${WHERE[@]}" "--worker=$worker" \
    "--command=$remote"
}
