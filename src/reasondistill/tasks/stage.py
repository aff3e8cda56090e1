"""`problems`: write the train and test problems of the chosen tasks into the run directory."""

from __future__ import annotations

import shutil

from pydantic import Field, field_validator, model_validator

from ..errors import UserError
from ..records import Problem, read_records, write_records
from ..rundir import RunDir, fingerprint
from ..stages import Stage, StageConfig
from ..ui import note
from . import BENCHMARKS, TASKS, get_benchmark, get_task


class ProblemsConfig(StageConfig):
    tasks: list[str] = Field(
        default_factory=lambda: list(TASKS), description="tasks to generate problems for"
    )
    train: int = Field(200, ge=0, description="training problems per task")
    train_per_task: dict[str, int] = Field(
        default_factory=dict, description="training problems for some tasks, overriding train"
    )
    test: int = Field(100, ge=0, description="held-out test problems per task")
    difficulty: dict[str, list[int]] = Field(
        default_factory=dict,
        description="difficulty levels per task, e.g. {arithmetic: [2, 3]}; others use defaults",
    )
    seed: int = Field(0, description="generation seed")


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


def run_tasks(run: RunDir) -> list[str]:
    """The tasks the `problems` step of the run wrote."""
    return sorted(p.name for p in (run.root / "problems").glob("*") if p.is_dir())


def load_problems(run: RunDir, selection: ProblemSelection, split: str, *, step: str) -> list[Problem]:
    """Problems of `split` for the selected tasks, in a stable order. An error naming `step` when a task
    named in the selection has none, or when there are none at all (a task left to the default may have
    none: `train_per_task: {logic: 0}` keeps logic for testing)."""
    tasks = selection.tasks or run_tasks(run)
    if not tasks:
        raise UserError(f"{run.root}: no problems; run the `problems` stage first")
    problems = []
    for task in tasks:
        get_task(task)
        path = run.problems(task, split)
        if not path.exists():
            raise UserError(f"{path}: no {split} problems for task {task!r}; add it to the `problems` stage")
        found = read_records(path, Problem)[: selection.limit]
        if not found and selection.tasks is not None:
            raise _none_in(step, run, [task], split)
        problems.extend(found)
    if not problems:
        raise _none_in(step, run, tasks, split)
    return problems


def _none_in(step: str, run: RunDir, tasks: list[str], split: str) -> UserError:
    files = ", ".join(str(run.problems(task, split).relative_to(run.root)) for task in tasks)
    return UserError(
        f"{step}: {files} {'holds' if len(tasks) == 1 else 'hold'} no {split} problems; "
        f"give the `problems` stage some (its `{split}` option)"
    )


def problems_by_id(run: RunDir) -> dict[str, Problem]:
    """Every problem of the run (all tasks and splits), by id: what graded traces are joined with."""
    paths = sorted((run.root / "problems").glob("*/*.parquet"))
    if not paths:
        raise UserError(f"{run.root}: no problems; run the `problems` stage first")
    return {p.id: p for path in paths for p in read_records(path, Problem)}


def run_problems(cfg: ProblemsConfig, run: RunDir, overwrite: bool) -> None:
    tasks = [get_task(name) for name in cfg.tasks]
    for name in [*cfg.difficulty, *cfg.train_per_task]:
        get_task(name)  # an unknown task name in an override is an error, not ignored

    def body(_fingerprint: str) -> dict:
        shutil.rmtree(run.root / "problems", ignore_errors=True)  # drop tasks an earlier setting had
        counts = {}
        for task in tasks:
            for split, n in (("train", cfg.train_per_task.get(task.name, cfg.train)), ("test", cfg.test)):
                problems = task.sample(split, n, cfg.seed, cfg.difficulty.get(task.name))
                write_records(run.problems(task.name, split), problems, Problem)
                counts[f"{task.name}/{split}"] = len(problems)
        return {"problems": counts}

    outputs = [run.problems(task.name, split) for task in tasks for split in ("train", "test")]
    result = run.step("problems", cfg, {}, body, outputs=outputs, overwrite=overwrite)
    note(f"problems: {', '.join(f'{k} {v}' for k, v in result['stats']['problems'].items())}")


STAGE = Stage(
    "problems",
    ProblemsConfig,
    run_problems,
    "generate seeded train/test problems of the testbed tasks",
    produces=lambda cfg: ["problems"],
)
