#!/usr/bin/env python
"""Run the training-sensitive tests against several builds of the testbed and show how close each came.

The testbed's models train to other weights on another CPU or with other library versions, and a test
whose threshold sits near an edge then flips. Each build here uses other seeds for the models' initial
weights and the teacher's data order (REASONDISTILL_TESTBED_SEED), a larger change than those last-bit
differences; a test that holds on all of them holds on a new machine. Run it before landing a change
to a training-sensitive test, to the testbed or to the pins (`make check-builds`):

    scripts/check_builds.py                  # builds 1, 2 and 3, then every test marked training_sensitive
    scripts/check_builds.py --seeds 0,4 -- -k objective_runs   # 0: the default build; after --: pytest args
    scripts/check_builds.py --seeds 0,1,2,3 --report-only       # the table of builds already run into --out

Builds are cached in --cache (about 7 minutes each on 2 CPU cores the first time). Every check made
through the `margin` fixture (tests/conftest.py) is recorded; the table lists, per check, its value and
bound on each build and the smallest margin over the builds (and numbers tests only record, without a
bound). Exits non-zero if any test failed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_build(seed: int, args: argparse.Namespace, pytest_args: list[str]) -> tuple[Path, Path, int]:
    """pytest -m training_sensitive against build `seed` (0: the default build); (margins, junit, status)."""
    out = args.out / f"build-{seed}"
    out.mkdir(parents=True, exist_ok=True)
    margins, junit = out / "margins.jsonl", out / "junit.xml"
    margins.unlink(missing_ok=True)
    env = {
        **os.environ,
        "REASONDISTILL_TEST_CACHE": str(args.cache),
        "REASONDISTILL_MARGINS": str(margins),
        "REASONDISTILL_TESTBED_SEED": str(seed) if seed else "",
    }
    command = [sys.executable, "-m", "pytest", "-m", "training_sensitive", "-p", "no:cacheprovider",
               f"--junitxml={junit}", "-q", *pytest_args]  # fmt: skip
    print(f"check-builds: build {seed or 'default'}: {' '.join(command[2:])}", flush=True)
    with open(out / "pytest.log", "w") as log:
        status = subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    print(
        f"check-builds: build {seed or 'default'}: pytest exit {status} (log: {out / 'pytest.log'})",
        flush=True,
    )
    return margins, junit, status


def outcomes(junit: Path) -> dict[str, str]:
    """test id → passed / failed / error / skipped, from a JUnit XML report."""
    if not junit.exists():
        return {}
    results = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        kinds = [child.tag for child in case]
        results[name] = next((k for k in ("failure", "error", "skipped") if k in kinds), "passed")
        results[name] = {"failure": "failed"}.get(results[name], results[name])
    return results


def cell(row: dict) -> str:
    """`value relation bound` of a check, or the value a test only recorded."""
    if row["relation"] is None:
        return f"{row['value']:.3g}"
    return f"{row['value']:.3g} {row['relation']} {row['bound']:.3g}"


def table(seeds: list[int], margins: dict[int, list[dict]]) -> list[str]:
    """Markdown: one row per check, `value relation bound` on each build, and the smallest margin."""
    checks: dict[tuple[str, str], dict[int, dict]] = defaultdict(dict)
    for seed, rows in margins.items():
        for row in rows:
            checks[(row["test"], row["what"])][seed] = row
    names = [f"build {s}" if s else "default" for s in seeds]
    lines = ["| test | check | " + " | ".join(names) + " | smallest margin |",
             "|---|---|" + "---|" * len(seeds) + "---|"]  # fmt: skip
    for (test, what), by_seed in sorted(checks.items()):
        cells = [cell(by_seed[s]) if s in by_seed else "–" for s in seeds]
        margins = [r["margin"] for r in by_seed.values() if r["margin"] is not None]
        smallest = f"{min(margins):+.3g}" if margins else "(recorded)"
        lines.append(f"| {test.split('::')[-1]} | {what} | " + " | ".join(cells) + f" | {smallest} |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--seeds", default="1,2,3", help="testbed builds, comma-separated (0: the default build)"
    )
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "reasondistill-builds")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "check-builds")
    parser.add_argument(
        "--report-only", action="store_true", help="run nothing: tabulate the builds already in --out"
    )
    args, pytest_args = parser.parse_known_args()
    pytest_args = [a for a in pytest_args if a != "--"]
    seeds = [int(s) for s in args.seeds.split(",")]
    margins, results, failed = {}, {}, False
    for seed in seeds:
        if args.report_only:
            build = args.out / f"build-{seed}"
            margin_file, junit = build / "margins.jsonl", build / "junit.xml"
            status = 0 if junit.exists() and not {"failed", "error"} & set(outcomes(junit).values()) else 1
        else:
            margin_file, junit, status = run_build(seed, args, pytest_args)
        margins[seed] = [json.loads(line) for line in margin_file.open()] if margin_file.exists() else []
        results[seed] = outcomes(junit)
        failed |= status != 0
    lines = [f"# Training-sensitive tests on {len(seeds)} testbed builds", "", *table(seeds, margins), ""]
    for seed in seeds:
        bad = sorted(name for name, outcome in results[seed].items() if outcome in ("failed", "error"))
        passed = sum(outcome == "passed" for outcome in results[seed].values())
        lines.append(f"- build {seed or 'default'}: {passed} passed, {len(bad)} failed" + "".join(
            f"\n  - {name}" for name in bad
        ))  # fmt: skip
    report = "\n".join(lines) + "\n"
    (args.out / "report.md").write_text(report)
    print(report)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
