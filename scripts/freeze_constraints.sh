#!/usr/bin/env bash
# Print constraints.txt for the environment in VENV (default .venv): every installed distribution pinned
# to its version, torch without its build tag (+cpu/+cu128: setup_env.sh picks the build per machine).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
python_version=$("$VENV/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
machine=$("$VENV/bin/python" -c 'import platform; print(platform.system(), platform.machine())')
cat <<HEADER
# The versions \`make test\` and \`make demo\` install (scripts/setup_env.sh): the environment the test
# suite was last validated in. Written by \`make update-pins\` (scripts/update_pins.sh) on $(date -u +%F),
# on $machine; do not edit by hand. pyproject.toml keeps the library's own ranges loose.
# python: $python_version
HEADER
"$VENV/bin/python" -m pip --disable-pip-version-check freeze --exclude-editable \
    | grep -v -e '^#' -e '^-e ' -e '^reasondistill' | sed -E 's/^(torch==[^+]+)\+.*/\1/' | LC_ALL=C sort -f
