#!/usr/bin/env python
"""The README's training-dependent tables, measured on several testbed builds: mean and range per cell.

The testbed's models train to other weights on another machine, and the demo's student sits near a
sharp transition in training (README, Quickstart), so one build's numbers say little about the next
machine's. This script is how the README's demo table and testbed teacher table are measured:

    scripts/measure_builds.py --seeds 0,1,2,3   # 0: the default build; others: REASONDISTILL_TESTBED_SEED
    scripts/measure_builds.py --parts selection  # only the teacher-selection table

Each build's runs go to --out/<part>-<seed> (resumed if they are there), with its testbed cached in
--cache. Prints markdown tables: the demo (greedy accuracy, sampled pass@1 and pass@4, mean tokens per
answer) with the wall time of each demo; the testbed teacher's greedy accuracy per difficulty; and the
teacher-selection recipe's ranking (its steps up to `select_teacher`: the table, not the final student).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
MODELS = {
    "teacher": "teacher",
    "student-distilled": "student, distilled",
    "student-answer-only": "student, answer-only",
}
TASKS = {
    "arithmetic": "arithmetic (2 digits)",
    "logic": "logic (depth 1–2)",
    "word_problems": "word problems (2–3 steps)",
}


TEACHER_TABLE = {"arithmetic": (2, 3, 4), "word_problems": (2, 3, 4), "logic": (2, 3, 4)}
TEACHER_PROBLEMS = 200


def build_env(seed: int, args: argparse.Namespace) -> dict[str, str]:
    """The environment of a process working on build `seed` (0: the default build)."""
    return {
        **os.environ,
        "REASONDISTILL_CACHE": str(args.cache),
        "REASONDISTILL_TESTBED_SEED": str(seed or ""),
    }


def run_demo(seed: int, args: argparse.Namespace) -> tuple[Path, float]:
    run_dir = args.out / f"demo-{seed}"
    env = build_env(seed, args)
    started = time.time()
    print(f"measure-builds: build {seed or 'default'} → {run_dir}", flush=True)
    with open(args.out / f"demo-{seed}.log", "w") as log:
        subprocess.run(
            [sys.executable, "-m", "reasondistill.cli", "demo", "--run-dir", str(run_dir)],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, check=True,
        )  # fmt: skip
    return run_dir, time.time() - started


def cell(values: list[float], percent: bool) -> str:
    scale, unit = (100, "%") if percent else (1, "")
    mean = f"{scale * statistics.fmean(values):.{1 if percent else 0}f}{unit}"
    if len(values) == 1:
        return mean
    low, high = scale * min(values), scale * max(values)
    return f"{mean} ({low:.0f}–{high:.0f}{unit})"


def table(run_dirs: list[Path]) -> list[str]:
    lines = [
        "| task | model | greedy | sampled pass@1 | pass@4 | tokens per answer |",
        "|---|---|---|---|---|---|",
    ]
    for task, task_label in TASKS.items():
        for i, (model, model_label) in enumerate(MODELS.items()):
            results = [json.loads((d / "eval" / model / f"{task}.json").read_text()) for d in run_dirs]
            row = [
                cell([r["greedy"]["accuracy"] for r in results], True),
                cell([r["sampled"]["accuracy"] for r in results], True),
                cell([r["sampled"]["pass@4"] for r in results], True),
                cell([r["sampled"]["mean_completion_tokens"] for r in results], False),
            ]
            lines.append(f"| {task_label if i == 0 else ''} | {model_label} | " + " | ".join(row) + " |")
    return lines


TEACHER_ACCURACY = """
import json, sys
from reasondistill.generate.base import SamplingParams
from reasondistill.generate.hf import HFGenerator
from reasondistill.tasks import TASKS
from reasondistill.testbed.models import build_testbed

teacher, table = HFGenerator(build_testbed() / "teacher", batch_size=200), {}
for name, levels in json.loads(sys.argv[1]).items():
    for level in levels:
        problems = TASKS[name].sample("test", int(sys.argv[2]), seed=11, difficulties=[level])
        outputs = teacher.generate([p.messages for p in problems], SamplingParams(temperature=0, max_new_tokens=300))
        grade = TASKS[name].grader.grade
        right = [grade(o[0].text, p, o[0].finish_reason).label == "correct" for o, p in zip(outputs, problems)]
        table[f"{name}/{level}"] = sum(right) / len(right)
print(json.dumps(table))
"""


def teacher_accuracy(seed: int, args: argparse.Namespace) -> dict[str, float]:
    """Greedy accuracy of build `seed`'s teacher per task and difficulty (a subprocess: one build each)."""
    command = [sys.executable, "-c", TEACHER_ACCURACY, json.dumps(TEACHER_TABLE), str(TEACHER_PROBLEMS)]
    done = subprocess.run(
        command, cwd=ROOT, env=build_env(seed, args), capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def teacher_table(tables: list[dict[str, float]]) -> list[str]:
    levels = sorted({level for levels in TEACHER_TABLE.values() for level in levels})
    lines = [
        "| task | " + " | ".join(f"difficulty {level}" for level in levels) + " |",
        "|---|" + "---|" * len(levels),
    ]
    for name, task_levels in TEACHER_TABLE.items():
        cells = [
            cell([t[f"{name}/{level}"] for t in tables], True) if level in task_levels else ""
            for level in levels
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


SELECTION_RECIPE = ROOT / "src" / "reasondistill" / "recipes" / "teacher-selection.yaml"


def run_selection(seed: int, args: argparse.Namespace) -> dict:
    """The teacher-selection recipe up to its select_teacher step on build `seed`; its result JSON."""
    recipe = yaml.safe_load(SELECTION_RECIPE.read_text())
    last = next(i for i, step in enumerate(recipe["steps"]) if "select_teacher" in step)
    recipe["steps"] = recipe["steps"][: last + 1]
    recipe["run_dir"] = str(args.out / f"selection-{seed}")
    path = args.out / f"selection-{seed}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    print(f"measure-builds: teacher selection, build {seed or 'default'} → {recipe['run_dir']}", flush=True)
    with open(args.out / f"selection-{seed}.log", "w") as log:
        subprocess.run(
            [sys.executable, "-m", "reasondistill.cli", "run", str(path)],
            cwd=ROOT, env=build_env(seed, args), stdout=log, stderr=subprocess.STDOUT, check=True,
        )  # fmt: skip
    name = recipe["steps"][last]["select_teacher"]["name"]
    return json.loads((Path(recipe["run_dir"]) / "teacher-selection" / f"{name}.json").read_text())


def selection_table(results: list[dict]) -> list[str]:
    """Per teacher: its rank on each build, then mean (min–max) of each measurement."""
    teachers = [row["teacher"] for row in results[0]["teachers"]]
    lines = [
        "| teacher | rank per build | verified acc. | length (student tokens) | proxy student acc. |",
        "|---|---|---|---|---|",
    ]
    ordered = sorted(teachers, key=lambda t: statistics.fmean(_row(r, t)["rank"] for r in results))
    for teacher in ordered:
        rows = [_row(r, teacher) for r in results]
        proxies = [
            row["proxy"]["accuracy"] for row in rows if row["proxy"] and row["proxy"]["accuracy"] is not None
        ]
        lines.append(
            f"| {teacher} | {', '.join(str(row['rank']) for row in rows)} | "
            f"{cell([row['accuracy'] for row in rows], True)} | "
            f"{cell([row['length_mean'] for row in rows if row['length_mean'] is not None], False)} | "
            f"{cell(proxies, True) if proxies else '–'} |"
        )
    return lines


def _row(result: dict, teacher: str) -> dict:
    return next(row for row in result["teachers"] if row["teacher"] == teacher)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", default="0,1,2,3", help="testbed builds, comma-separated (0: the default)")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "reasondistill-builds")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "measure-builds")
    parser.add_argument(
        "--parts",
        default="demo,teacher,selection",
        help="which tables, comma-separated: demo, teacher, selection",
    )
    args = parser.parse_args()
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    seeds = [int(seed) for seed in args.seeds.split(",")]
    parts = set(args.parts.split(","))
    lines = []
    if "demo" in parts:
        runs = [run_demo(seed, args) for seed in seeds]
        lines += [
            f"Demo on {len(runs)} testbed builds ({args.seeds}): mean (min–max)",
            "",
            *table([d for d, _ in runs]),
            "",
            "wall time per demo (s): " + ", ".join(f"{seconds:.0f}" for _, seconds in runs),
            "",
        ]
    if "teacher" in parts:
        teachers = [teacher_accuracy(seed, args) for seed in seeds]
        lines += [
            f"Testbed teacher, greedy accuracy on {TEACHER_PROBLEMS} held-out problems per difficulty: "
            "mean (min–max)",
            "",
            *teacher_table(teachers),
            "",
        ]
    if "selection" in parts:
        selections = [run_selection(seed, args) for seed in seeds]
        lines += [
            f"Teacher selection on {len(seeds)} builds ({args.seeds})",
            "",
            *selection_table(selections),
        ]
    report = "\n".join(lines) + "\n"
    (args.out / f"report-{'-'.join(sorted(parts))}.md").write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
