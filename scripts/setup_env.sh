#!/usr/bin/env bash
# Create .venv and install reasondistill with its dev tools, choosing the right torch build first:
#   - a machine with an NVIDIA GPU gets the default (CUDA) build;
#   - a CPU-only machine gets a CPU build: a local wheel if pip's find-links has one (no download),
#     otherwise PyTorch's CPU index (about 200 MB instead of several GB of CUDA packages).
# A torch already present in the venv is kept. Rerunning is cheap: pip skips what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_CPU_VERSION=${TORCH_CPU_VERSION:-2.13.0}
TORCH_CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check "$@"; }

if "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    echo "setup: keeping installed torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: NVIDIA GPU found, installing the default (CUDA) torch build"
    pip install -q torch
else
    probe=$(mktemp -d)
    if pip download -q --no-deps --no-index "torch==$TORCH_CPU_VERSION" -d "$probe" >/dev/null 2>&1 \
        && ls "$probe" | grep -q '+cpu'; then
        echo "setup: no GPU, installing the local CPU wheel of torch $TORCH_CPU_VERSION"
        pip install -q "torch==$TORCH_CPU_VERSION"
    else
        echo "setup: no GPU, installing torch from the CPU index $TORCH_CPU_INDEX"
        pip install -q torch --index-url "$TORCH_CPU_INDEX"
    fi
    rm -rf "$probe"
fi

pip install -q -e ".[dev]"
echo "setup: done ($("$VENV/bin/python" -c 'import torch, transformers; print("torch", torch.__version__, "| transformers", transformers.__version__)'))"
