"""`problems`: write the train and test problems of the chosen tasks into the run directory."""

from __future__ import annotations

import shutil

from pydantic import Field

from ..config import StageConfig
from ..records import Problem, write_records
from ..rundir import RunDir
from ..tasks import TASKS, get_task
from ..ui import note
from .base import Stage


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
