#!/usr/bin/env bash
# Create the peer-benchmark environment: this repo + google-tunix in a venv of their own.
#
#   bash bench/setup_peer_env.sh [VENV_DIR]          # default VENV_DIR: /tmp/rlver-peer-venv
#   VENV_DIR/bin/python bench/peer_bench.py                # run the side-by-side benchmark
#
# tunix is never installed into the dev / CI env (its dependency tree is large and pins
# safetensors<0.8). The repo is installed first (jax==0.10.2, flax, optax, ... from
# pyproject.toml), then tunix with bench/requirements-peer.txt: pip keeps the installed jax
# when tunix accepts it, so both tools run on the same jax. The last step prints the versions
# the benchmark will use and `pip check`'s verdict: the known safetensors / transformers /
# tokenizers conflicts are expected (see bench/requirements-peer.txt). Takes a few minutes.
set -euo pipefail
VENV="${1:-/tmp/rlver-peer-venv}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"

"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --upgrade pip
"$VENV/bin/python" -m pip install -e "$REPO"
"$VENV/bin/python" -m pip install -r "$REPO/bench/requirements-peer.txt"
"$VENV/bin/python" -m pip check || echo "(pip check: expected conflicts, see requirements-peer.txt)"
"$VENV/bin/python" - <<'PY'
import importlib.metadata as md

import jax

for name in ("jax", "jaxlib", "flax", "google-tunix", "qwix", "safetensors", "rlver-jax"):
    print(f"{name:>14} {md.version(name)}")
print("devices", jax.devices())
import tunix.generate.sampler  # noqa: F401  (fails loudly here, not in the benchmark)
import tunix.rl.grpo.grpo_learner  # noqa: F401

print("tunix imports OK")
PY
echo "peer env ready: $VENV/bin/python bench/peer_bench.py"
