"""What a stage works on: which testbed tasks, which public benchmarks, and the grader of each."""

from __future__ import annotations

from pydantic import Field, PrivateAttr, field_validator, model_validator

from ..config import StageConfig
from ..records import Problem
from ..rundir import fingerprint
from ..verify.graders import GRADER_SPECS, Grader, grader_from_spec
from . import BENCHMARKS, TASKS, default_grader, get_benchmark


class ProblemSelection(StageConfig):
    tasks: list[str] | None = Field(
        None, description="testbed tasks to use (default: every task in problems/)"
    )
    limit: int | None = Field(None, ge=1, description="at most this many problems per task")


class BenchmarkSelection(StageConfig):
    benchmarks: list[str] = Field(
        default_factory=list, description=f"public benchmarks ({', '.join(BENCHMARKS)})"
    )
    data_file: list[str] = Field(
        default_factory=list,
        description="local copy of a benchmark instead of its Hub dataset: PATH (with one benchmark) "
        "or NAME=PATH",
    )

    @field_validator("benchmarks")
    @classmethod
    def _known_benchmarks(cls, names: list[str]) -> list[str]:
        unknown = [name for name in names if name not in BENCHMARKS]
        if unknown:
            raise ValueError(f"unknown benchmark {unknown[0]!r}; known: {', '.join(BENCHMARKS)}")
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
    overrides, so that filtered data and reported scores are graded alike."""

    graders: dict[str, str] = Field(
        default_factory=dict,
        description='grader per task or benchmark instead of its own, e.g. {"gsm8k": "math-verify:number"}; '
        f"graders: {', '.join(GRADER_SPECS)}",
    )
    _built: dict[str, Grader] = PrivateAttr(default_factory=dict)

    @field_validator("graders")
    @classmethod
    def _known_tasks_and_graders(cls, graders: dict[str, str]) -> dict[str, str]:
        for task, spec in graders.items():
            if task not in TASKS and task not in BENCHMARKS:
                raise ValueError(f"unknown task {task!r}; known: {', '.join([*TASKS, *BENCHMARKS])}")
            grader_from_spec(spec)
        return graders

    def grader_for(self, task: str) -> Grader:
        if task not in self._built:
            spec = self.graders.get(task)
            self._built[task] = grader_from_spec(spec) if spec else default_grader(task)
        return self._built[task]
