"""`verify`: grade every trace with its task's grader → correct / incorrect / unparseable."""

from __future__ import annotations

from collections import Counter, defaultdict

from pydantic import Field, PrivateAttr, field_validator

from ..errors import UserError
from ..generate.stage import read_traces
from ..records import GradedTrace, write_records
from ..rundir import RunDir
from ..stages import Stage, StageConfig
from ..tasks import BENCHMARKS, TASKS, default_grader
from ..tasks.stage import problems_by_id, run_tasks
from ..ui import note, progress_bar
from .graders import GRADER_SPECS, Grader, grader_from_spec
from .grading import grade_traces


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


class VerifyConfig(GraderChoice):
    traces: str = Field(
        description="name of the traces to grade (traces/<name>); the output is graded/<name>"
    )


def label_counts(graded: list[GradedTrace]) -> dict[str, dict[str, int]]:
    by_task: dict[str, Counter] = defaultdict(Counter)
    for g in graded:
        by_task[g.task][g.label] += 1
    return {task: dict(counts) for task, counts in sorted(by_task.items())}


def run_verify(cfg: VerifyConfig, run: RunDir, overwrite: bool) -> None:
    inputs = {
        "traces": run.finished_step(f"generate:{cfg.traces}")["fingerprint"],
        "problems": run.finished_step("problems")["fingerprint"],
        # A grader's id changes with its code version and configuration: regrade when it does.
        "graders": {task: cfg.grader_for(task).id for task in run_tasks(run)},
    }

    def body(_fingerprint: str) -> dict:
        problems = problems_by_id(run)
        jobs = [
            (trace, problems[trace.problem_id], cfg.grader_for(problems[trace.problem_id].task))
            for trace in read_traces(run.traces(cfg.traces), problems)
        ]
        with progress_bar(f"verify {cfg.traces}", total=len(jobs), unit="traces") as bar:
            graded = grade_traces(jobs, progress=bar.advance)
        if not graded:
            raise UserError(f"verify:{cfg.traces}: traces/{cfg.traces} holds no traces to grade")
        write_records(run.graded(cfg.traces), graded, GradedTrace)
        return {"labels": label_counts(graded), "graders": {g.task: g.grader for g in graded}}

    outputs = [run.graded(cfg.traces)]
    result = run.step(f"verify:{cfg.traces}", cfg, inputs, body, outputs=outputs, overwrite=overwrite)
    for task, counts in result["stats"]["labels"].items():
        total = sum(counts.values())
        note(f"verify:{cfg.traces}: {task}: {counts.get('correct', 0)}/{total} correct, {counts}")


STAGE = Stage(
    "verify",
    VerifyConfig,
    run_verify,
    "grade traces with each task's grader",
    produces=lambda cfg: [f"verify:{cfg.traces}"],
    requires=lambda cfg: {"traces": f"generate:{cfg.traces}"},
)
