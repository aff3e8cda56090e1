"""`problems`: write the train and test problems of testbed tasks and of problem sets into the run directory."""

from __future__ import annotations

import shutil

from pydantic import Field, model_validator

from ..config import StageConfig
from ..errors import UserError
from ..records import Problem, write_records
from ..rundir import RunDir
from ..tasks import TASKS, get_task
from ..tasks.problem_sets import PRESETS, ProblemSetSpec, load_problem_set, set_file_sha256
from ..ui import note
from .base import Stage


class ProblemsConfig(StageConfig):
    tasks: list[str] | None = Field(
        None, description="testbed tasks to generate problems for (default: all of them, or none beside sets)"
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
    sets: list[ProblemSetSpec] = Field(
        default_factory=list,
        description="problem sets from files, Hub datasets or known train splits, each "
        "{name, file | hub | preset, fields, answer_from, template, grader, limit, test_fraction, seed}; "
        f"presets: {', '.join(PRESETS)}",
    )

    @model_validator(mode="after")
    def _distinct_names(self) -> ProblemsConfig:
        seen = set(self.task_names())
        for spec in self.sets:
            if spec.name in seen or spec.name in TASKS:
                raise ValueError(f"problem set name {spec.name!r} is taken (a testbed task or another set)")
            seen.add(spec.name)
        return self

    def task_names(self) -> list[str]:
        if self.tasks is not None:
            return self.tasks
        return [] if self.sets else list(TASKS)


def run_problems(cfg: ProblemsConfig, run: RunDir, overwrite: bool) -> None:
    tasks = [get_task(name) for name in cfg.task_names()]
    for name in [*cfg.difficulty, *cfg.train_per_task]:
        get_task(name)  # an unknown task name in an override is an error, not ignored
    if not tasks and not cfg.sets:
        raise UserError("problems: no tasks and no sets; name testbed tasks or give problem sets")
    # a local file's content is an input: an edited file makes the step run again
    digests = {spec.name: set_file_sha256(spec) for spec in cfg.sets if spec.file}

    def body(_fingerprint: str) -> dict:
        # every set reads before any writes
        loaded = {spec.name: load_problem_set(spec, digests.get(spec.name)) for spec in cfg.sets}
        shutil.rmtree(run.root / "problems", ignore_errors=True)  # drop tasks an earlier setting had
        counts, sets = {}, {}
        for task in tasks:
            for split, n in (("train", cfg.train_per_task.get(task.name, cfg.train)), ("test", cfg.test)):
                problems = task.sample(split, n, cfg.seed, cfg.difficulty.get(task.name))
                write_records(run.problems(task.name, split), problems, Problem)
                counts[f"{task.name}/{split}"] = len(problems)
        for spec in cfg.sets:
            problem_set = loaded[spec.name]
            for split, problems in (("train", problem_set.train), ("test", problem_set.test)):
                write_records(run.problems(spec.name, split), problems, Problem)
                counts[f"{spec.name}/{split}"] = len(problems)
            sets[spec.name] = {
                "source": problem_set.source,
                "grader": spec.grader,
                "difficulty_label": spec.difficulty_label,
                "dropped": problem_set.dropped,
            }
        return {"problems": counts, "sets": sets}

    outputs = [run.problems(task.name, split) for task in tasks for split in ("train", "test")]
    outputs += [run.problems(spec.name, split) for spec in cfg.sets for split in ("train", "test")]
    inputs = {f"set:{name}": digest for name, digest in digests.items()}
    result = run.step("problems", cfg, inputs, body, outputs=outputs, overwrite=overwrite)
    note(f"problems: {', '.join(f'{k} {v}' for k, v in result['stats']['problems'].items())}")
    for name, info in result["stats"].get("sets", {}).items():
        if info["dropped"]:
            note(f"problems: {name}: left out {info['dropped']['bad_answer']} rows without a readable answer")


STAGE = Stage(
    "problems",
    ProblemsConfig,
    run_problems,
    "write seeded train/test problems of testbed tasks and of problem sets (files, Hub datasets)",
    produces=lambda cfg: ["problems"],
)
