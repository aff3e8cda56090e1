"""Tasks by name: the generated testbed tasks, and public benchmarks loaded from files or the Hub."""

from __future__ import annotations

from ..errors import UserError
from ..verify.graders import Grader
from .arithmetic import ArithmeticTask
from .base import GeneratedTask
from .benchmarks import SINGLE_BENCHMARKS, Benchmark
from .catalog import BENCHMARKS, SUITES, expand_suites
from .logic import LogicTask
from .word_problems import WordProblemTask

TASKS: dict[str, GeneratedTask] = {
    task.name: task for task in (ArithmeticTask(), WordProblemTask(), LogicTask())
}


__all__ = [
    "BENCHMARKS", "SINGLE_BENCHMARKS", "SUITES", "TASKS", "Benchmark", "GeneratedTask", "default_grader",
    "expand_suites", "get_benchmark", "get_task", "task_or_benchmark",
]  # fmt: skip


def get_task(name: str) -> GeneratedTask:
    try:
        return TASKS[name]
    except KeyError:
        raise UserError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}") from None


def get_benchmark(name: str) -> Benchmark:
    try:
        return BENCHMARKS[name]
    except KeyError:
        raise UserError(f"unknown benchmark {name!r}; known benchmarks: {', '.join(BENCHMARKS)}") from None


def task_or_benchmark(name: str) -> GeneratedTask | Benchmark:
    source = TASKS.get(name) or BENCHMARKS.get(name)
    if source is None:
        raise UserError(f"unknown task {name!r}; known: {', '.join([*TASKS, *BENCHMARKS])}")
    return source


def default_grader(name: str) -> Grader:
    """The grader a testbed task or a benchmark owns."""
    return task_or_benchmark(name).grader
