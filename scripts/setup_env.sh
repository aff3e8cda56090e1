#!/usr/bin/env bash
# Create .venv and install reasondistill with its dev tools at the versions the test suite was validated
# with (constraints.txt), choosing the right torch build first:
#   - a machine with an NVIDIA GPU gets the default (CUDA) build;
#   - a CPU-only machine gets a CPU build: a local wheel if pip's find-links has one (no download),
#     otherwise PyTorch's CPU index (about 200 MB instead of several GB of CUDA packages).
# A torch already present in the venv is kept (with a warning when it is not the pinned one). Rerunning
# is cheap: pip skips what is installed and moves what differs from the pins back to them.
#
# constraints.txt holds pins for one Python version (its `# python:` line). On another Python, or with
# REASONDISTILL_UNPINNED=1 (what `make update-pins` uses), the newest versions pyproject.toml allows are
# installed instead, with a warning: the suite has not been validated with them.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
CONSTRAINTS=${CONSTRAINTS:-constraints.txt}
TORCH_CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check "$@"; }

pinned_python=$(sed -n 's/^# python: *//p' "$CONSTRAINTS")
venv_python=$("$VENV/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
pins=$(mktemp); trap 'rm -f "$pins"' EXIT
if [ -n "${REASONDISTILL_UNPINNED:-}" ]; then
    echo "setup: REASONDISTILL_UNPINNED set: installing the newest versions pyproject.toml allows"
elif [ "$venv_python" != "$pinned_python" ]; then
    echo "setup: warning: $CONSTRAINTS pins Python $pinned_python packages; this is Python $venv_python," \
        "so the newest versions pyproject.toml allows are installed (not the validated ones)" >&2
else
    # torch is installed below, build by build; the rest comes from the pins
    grep -v '^torch==' "$CONSTRAINTS" >"$pins"
fi
TORCH_VERSION=${TORCH_VERSION:-$(sed -n 's/^torch==//p' "$CONSTRAINTS")}  # pinned even when the rest is not

if "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    installed=$("$VENV/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])')
    echo "setup: keeping installed torch $installed"
    if [ -s "$pins" ] && [ "$installed" != "$TORCH_VERSION" ]; then
        echo "setup: warning: the suite was validated with torch $TORCH_VERSION, not $installed" >&2
    fi
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: NVIDIA GPU found, installing the default (CUDA) build of torch $TORCH_VERSION"
    pip install -q "torch==$TORCH_VERSION"
else
    probe=$(mktemp -d)
    if pip download -q --no-deps --no-index "torch==$TORCH_VERSION" -d "$probe" >/dev/null 2>&1 \
        && ls "$probe" | grep -q '+cpu'; then
        echo "setup: no GPU, installing the local CPU wheel of torch $TORCH_VERSION"
        pip install -q "torch==$TORCH_VERSION"
    else
        echo "setup: no GPU, installing torch $TORCH_VERSION from the CPU index $TORCH_CPU_INDEX"
        pip install -q "torch==$TORCH_VERSION" --index-url "$TORCH_CPU_INDEX"
    fi
    rm -rf "$probe"
fi

if [ -s "$pins" ]; then
    pip install -q -c "$pins" -e ".[dev]"
    echo "setup: installed the versions pinned in $CONSTRAINTS"
else
    pip install -q -e ".[dev]"
fi
echo "setup: done ($("$VENV/bin/python" -c 'import torch, transformers; print("torch", torch.__version__, "| transformers", transformers.__version__)'))"
