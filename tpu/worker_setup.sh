#!/usr/bin/env bash
# Runs ON each TPU VM worker (tpu/setup.sh starts it on all of them): a Python >= 3.11 (TPU VM
# images ship 3.10: deadsnakes' 3.11 is installed and put first on PATH for install.sh), the
# project with jax[tpu] (./install.sh tpu), and gcsfs, through which orbax / etils read and write
# gs:// checkpoints (the VM's service account provides the credentials).
#   bash tpu/worker_setup.sh [--dry-run] [DIR]
set -euo pipefail
dry=0
if [ "${1:-}" = --dry-run ]; then dry=1; shift; fi
dir="${1:-$(cd "$(dirname "$0")/.." && pwd)}"
run() {
  if [ "$dry" = 1 ]; then echo "$*"; else echo "+ $*" >&2; "$@"; fi
}
cd "$dir"
if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  if ! python3.11 -c 'import ensurepip, venv' 2>/dev/null; then  # absent, or no venv
    run sudo add-apt-repository -y ppa:deadsnakes/ppa
    run sudo apt-get update -qq
    run sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3.11 python3.11-venv
  fi
  run mkdir -p "$HOME/.rlver-py"
  run ln -sf "$(command -v python3.11 || echo /usr/bin/python3.11)" "$HOME/.rlver-py/python3"
  export PATH="$HOME/.rlver-py:$PATH"
fi
run ./install.sh tpu
run .venv/bin/python -m pip install -q gcsfs
run .venv/bin/python -c "import jax, rlver_jax; print('jax', jax.__version__, 'ready')"
echo "$(hostname): rlver_jax installed in $dir/.venv"
