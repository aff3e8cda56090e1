"""Grading traces: one (`grade_trace`) or many at once (`grade_traces`).

Many are graded from a pool of threads as large as the machine's cores. A regex grader gains little
from it, but math-verify grades in helper processes (`timebound.py`, one per core), so N threads keep
N hard answers — seconds of SymPy each — in flight at once instead of one after another.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from ..records import GradedTrace, Problem, Trace
from .graders import Grader
from .timebound import available_cores


def grade_trace(trace: Trace, problem: Problem, grader: Grader) -> GradedTrace:
    verdict = grader.grade(trace.completion, problem, trace.finish_reason)
    return GradedTrace(
        **trace.model_dump(), label=verdict.label, extracted=verdict.extracted, grader=grader.id
    )


def grade_traces(
    jobs: Sequence[tuple[Trace, Problem, Grader]],
    workers: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[GradedTrace]:
    """`grade_trace` of every (trace, problem, grader), in order, from `workers` threads (default:
    the available cores); `progress(1)` after each."""

    def grade(job: tuple[Trace, Problem, Grader]) -> GradedTrace:
        graded = grade_trace(*job)
        if progress is not None:
            progress(1)
        return graded

    workers = workers or available_cores()
    if workers == 1 or len(jobs) <= 1:
        return [grade(job) for job in jobs]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grade") as pool:
        return list(pool.map(grade, jobs))
