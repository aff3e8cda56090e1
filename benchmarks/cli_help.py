"""How long `reasondistill --help` and `reasondistill <stage> --help` take: this tree against an
earlier commit's, in one run.

Baseline: the package as it was at `--baseline` (default 86bc714, before issue 19, when printing any
help imported every stage module, torch and transformers), unpacked with `git archive` into a
temporary folder and run by the same interpreter and virtualenv with PYTHONPATH pointing at it —
like for like but for the package's own code. Each command is a fresh process (what a user waits
for), run `--repeat` times; the median is reported.

    .venv/bin/python benchmarks/cli_help.py [--baseline 86bc714] [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ([], ["train"], ["generate"], ["eval"], ["curate"], ["report"])


def seconds(src: Path, command: list[str], repeat: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(src)}
    code = "import sys; from reasondistill.cli import main; main(sys.argv[1:])"
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        subprocess.run(
            [sys.executable, "-c", code, *command, "--help"], env=env, check=True, capture_output=True
        )
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--baseline", default="86bc714", help="the commit to compare with")
    parser.add_argument("--repeat", type=int, default=5, help="runs of each command (median reported)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        archive = subprocess.run(
            ["git", "archive", args.baseline, "src"], cwd=ROOT, check=True, capture_output=True
        ).stdout
        with tarfile.open(fileobj=BytesIO(archive)) as tar:
            tar.extractall(folder, filter="data")
        print(f"{'command':<28} {'this tree':>10} {args.baseline:>10} {'speed-up':>9}")
        for command in COMMANDS:
            now = seconds(ROOT / "src", command, args.repeat)
            before = seconds(Path(folder) / "src", command, args.repeat)
            name = " ".join(["reasondistill", *command, "--help"])
            print(f"{name:<28} {now:>9.2f}s {before:>9.2f}s {before / now:>8.1f}x")


if __name__ == "__main__":
    main()
