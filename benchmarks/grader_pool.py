"""Hard answers graded by MathGrader from many threads: its pool of helpers against one helper.

"Hard" answers are closed forms a model really writes and SymPy really struggles with (it evaluates
them to integers of millions of digits): a huge binomial, power towers, and one tower
(`2^{2^{2^{2^{100}}}}`) that never finishes and is cut off at the grader's time limit (its helper is
killed and replaced). Each kind is timed alone first; then all answers are graded with
`grader.grade` from a ThreadPoolExecutor, as a pipeline would.

Baseline, in the same run: the same MathGrader whose TimeBoundCall has `workers=1`. One helper
shared by all threads, each call waiting for the one before, is exactly the behaviour before the
pool (one helper per grader behind a lock): it is the same code path with a pool of one. The work
is CPU-bound and the pool is sized to the cores this process may use, so the ratio is bounded by the
core count (2x at best on a 2-core machine, less when other work shares the cores) and by the
number of threads. Helper start-up (importing SymPy) is inside both timings, as in a real run.

    .venv/bin/python benchmarks/grader_pool.py [--answers 200] [--threads 8] [--timeout 5]
"""

from __future__ import annotations

import argparse
import itertools
import logging
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from reasondistill.records import Message, Problem
from reasondistill.verify.graders import MathGrader, _import_math_verify, _math_verdict
from reasondistill.verify.timebound import TimeBoundCall, available_cores

HARD_ANSWERS = {  # seconds alone on an idle core of the 2-core development machine: ~1.5, 1.5, 0.6, cut off
    "binomial": "\\binom{150000}{75000}",
    "power-tower": "3^{2^{23}}",
    "huge-power": "2^{10^{8}}",
    "never-finishes": "2^{2^{2^{2^{100}}}}",
}
PROBLEM = Problem(id="p", task="math", messages=[Message(role="user", content="q")], answer="343")


def completion(answer: str) -> str:
    return f"<think>Working it out.</think>Therefore the answer is $\\boxed{{{answer}}}$."


def math_grader(timeout_s: float, workers: int | None) -> MathGrader:
    """A MathGrader as users make it; with `workers`, its helper pool capped at that many."""
    grader = MathGrader(gold_format="number", timeout_s=timeout_s)
    if workers is not None:
        grader._call = TimeBoundCall(_math_verdict, timeout_s, prepare=_import_math_verify, workers=workers)
    return grader


def time_alone(timeout_s: float) -> None:
    grader = math_grader(timeout_s, workers=1)
    grader.grade(completion("343"), PROBLEM)  # start the helper outside the measurement
    for kind, answer in HARD_ANSWERS.items():
        started = time.perf_counter()
        label = grader.grade(completion(answer), PROBLEM).label
        print(f"  one {kind:<18} answer alone: {time.perf_counter() - started:5.2f} s ({label})")


def grade_all(grader: MathGrader, completions: list[str], threads: int) -> tuple[float, list[str]]:
    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        labels = [v.label for v in pool.map(lambda text: grader.grade(text, PROBLEM), completions)]
    return time.perf_counter() - started, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--answers", type=int, default=200, help="hard answers to grade")
    parser.add_argument("--threads", type=int, default=8, help="threads grading at once")
    parser.add_argument("--timeout", type=float, default=5.0, help="MathGrader's timeout_s")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # each cut-off answer logs a warning; they are counted below
    answers = itertools.islice(itertools.cycle(HARD_ANSWERS.values()), args.answers)
    completions = [completion(answer) for answer in answers]
    print(f"{args.answers} hard answers, {args.threads} threads, timeout {args.timeout} s")
    time_alone(args.timeout)
    results = {}
    for name, workers in (("before: one helper behind a lock", 1), ("after:  a pool of helpers", None)):
        grader = math_grader(args.timeout, workers)
        seconds, labels = grade_all(grader, completions, args.threads)
        print(f"{name} (workers={grader._call.workers}): {seconds:6.1f} s  {dict(Counter(labels))}")
        results[workers] = seconds, labels
    (before_s, before), (after_s, after) = results[1], results[None]
    agree = sum(a == b for a, b in zip(before, after, strict=True))
    print(
        f"speed-up: {before_s / after_s:.2f}x on {available_cores()} cores; labels agree on {agree}/{len(after)}"
    )


if __name__ == "__main__":
    main()
