"""What a stage works on: which testbed tasks, which public benchmarks, and the grader of each."""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import Field, PrivateAttr, field_validator, model_validator

from ..config import StageConfig
from ..errors import UserError
from ..records import Problem
from ..rundir import fingerprint
from ..verify.graders import GRADER_SPECS, Grader, grader_from_spec
from . import (
    BENCHMARKS,
    SINGLE_BENCHMARKS,
    SUITES,
    TASKS,
    default_grader,
    expand_suites,
    get_benchmark,
    task_or_benchmark,
)
from .problem_sets import SetInfo


class ProblemSelection(StageConfig):
    tasks: list[str] | None = Field(
        None, description="testbed tasks to use (default: every task in problems/)"
    )
    limit: int | None = Field(None, ge=1, description="at most this many problems per task")


class BenchmarkSelection(StageConfig):
    benchmarks: list[str] = Field(
        default_factory=list,
        description=f"public benchmarks ({', '.join(SINGLE_BENCHMARKS)}) and suites of them ({', '.join(SUITES)}); "
        "`reasondistill benchmarks` lists every one",
    )
    data_file: list[str] = Field(
        default_factory=list,
        description="local copy of a benchmark instead of its Hub dataset: PATH (with one benchmark) "
        "or NAME=PATH",
    )

    @field_validator("benchmarks")
    @classmethod
    def _known_benchmarks(cls, names: list[str]) -> list[str]:
        """Suites become their benchmarks; an unknown name is an error."""
        names = expand_suites(names)
        unknown = [name for name in names if name not in BENCHMARKS]
        if unknown:
            raise ValueError(
                f"unknown benchmark {unknown[0]!r}; known: {', '.join(SINGLE_BENCHMARKS)}, the suites "
                f"{', '.join(SUITES)} and their members (`reasondistill benchmarks`)"
            )
        return names

    @model_validator(mode="after")
    def _data_files_name_benchmarks(self) -> BenchmarkSelection:
        self.data_files()
        return self

    def data_files(self) -> dict[str, str]:
        """The local file of each benchmark given one, by benchmark name."""
        files = {}
        for entry in self.data_file:
            name, separator, path = entry.partition("=")
            if not separator or name not in BENCHMARKS:
                if len(self.benchmarks) != 1:
                    raise ValueError(f"data file {entry!r}: with several benchmarks, write NAME=PATH")
                name, path = self.benchmarks[0], entry
            if name not in self.benchmarks:
                raise ValueError(f"data file {entry!r}: {name} is not among the benchmarks")
            files[name] = path
        return files


def load_benchmarks(selection: BenchmarkSelection, limit: int | None = None) -> dict[str, list[Problem]]:
    """The problems of each selected benchmark, from its data file or its default source."""
    files = selection.data_files()
    return {name: get_benchmark(name).load(files.get(name), limit) for name in selection.benchmarks}


def benchmark_inputs(benchmarks: dict[str, list[Problem]]) -> dict[str, str]:
    """Step inputs for loaded benchmarks: a fingerprint of their problems, whatever source they came from."""
    return {f"benchmark:{name}": fingerprint([p.model_dump() for p in ps]) for name, ps in benchmarks.items()}


class GraderChoice(StageConfig):
    """The grader of each task: its own unless overridden. Give `verify` and `eval` the same
    overrides, so that filtered data and reported scores are graded alike. A run's problem sets
    (`problems` stage, `sets`) bring their own graders: a stage binds them with `bind_sets`."""

    graders: dict[str, str] = Field(
        default_factory=dict,
        description='grader per task, problem set or benchmark instead of its own, e.g. {"gsm8k": '
        '"math-verify:number"}; graders: ' + ", ".join(GRADER_SPECS),
    )
    _built: dict[str, Grader] = PrivateAttr(default_factory=dict)
    _sets: dict[str, SetInfo] = PrivateAttr(default_factory=dict)

    @field_validator("graders")
    @classmethod
    def _known_graders(cls, graders: dict[str, str]) -> dict[str, str]:
        for spec in graders.values():
            grader_from_spec(spec)  # task names are checked against the run's in bind_sets
        return graders

    def bind_sets(self, sets: Mapping[str, SetInfo]) -> None:
        """The run's problem sets; an override naming neither a task, a benchmark nor one of them is an error."""
        self._sets, self._built = dict(sets), {}
        unknown = [
            name for name in self.graders if name not in TASKS and name not in BENCHMARKS and name not in sets
        ]
        if unknown:
            known = ", ".join([*TASKS, *sets, *BENCHMARKS])
            raise UserError(f"graders: unknown task {unknown[0]!r}; known: {known}")

    @property
    def bound_sets(self) -> dict[str, SetInfo]:
        """The problem sets bound by `bind_sets` (to pass on to options built from these)."""
        return dict(self._sets)

    def grader_for(self, task: str) -> Grader:
        if task not in self._built:
            spec = self.graders.get(task) or (self._sets[task].grader if task in self._sets else None)
            self._built[task] = grader_from_spec(spec) if spec else default_grader(task)
        return self._built[task]

    def difficulty_label(self, task: str) -> str | None:
        """What a task's difficulty levels count, for reports."""
        if task in self._sets:
            return self._sets[task].difficulty_label
        return task_or_benchmark(task).difficulty_label
