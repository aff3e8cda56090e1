"""Tasks by name. The testbed tasks are generated; benchmark loaders register here too."""

from __future__ import annotations

from ..errors import UserError
from .arithmetic import ArithmeticTask
from .base import GeneratedTask
from .logic import LogicTask
from .word_problems import WordProblemTask

TASKS: dict[str, GeneratedTask] = {
    task.name: task for task in (ArithmeticTask(), WordProblemTask(), LogicTask())
}


def get_task(name: str) -> GeneratedTask:
    try:
        return TASKS[name]
    except KeyError:
        raise UserError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}") from None
