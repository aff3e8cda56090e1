#!/usr/bin/env bash
# Move the pins forward on purpose instead of drifting: resolve the newest versions pyproject.toml allows
# into a fresh venv (.venv-pins), run the test suite there, and only if it passes write them to
# constraints.txt (then review `git diff constraints.txt`, run `make check-builds`, and commit).
# torch stays at its pin unless TORCH_VERSION names another release. Arguments go to pytest
# (e.g. `scripts/update_pins.sh -x`).
set -euo pipefail
cd "$(dirname "$0")/.."
export VENV=.venv-pins
rm -rf "$VENV"
REASONDISTILL_UNPINNED=1 scripts/setup_env.sh
VENV=$VENV scripts/freeze_constraints.sh >constraints.txt.new
echo "update-pins: resolved; changes against constraints.txt:"
diff <(grep -v '^#' constraints.txt) <(grep -v '^#' constraints.txt.new) || true
if "$VENV/bin/python" -m pytest "$@"; then
    mv constraints.txt.new constraints.txt
    echo "update-pins: the suite passed; constraints.txt updated (run make check-builds before committing)"
else
    echo "update-pins: the suite failed with these versions; constraints.txt is unchanged," \
        "the candidate pins are in constraints.txt.new and the environment in $VENV" >&2
    exit 1
fi
