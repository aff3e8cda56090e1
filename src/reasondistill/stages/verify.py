"""`verify`: grade every trace with its task's grader → correct / incorrect / unparseable."""

from __future__ import annotations

from collections import Counter, defaultdict

from pydantic import Field

from ..errors import UserError
from ..records import GradedTrace, write_records
from ..rundir import RunDir
from ..store import problem_sets, problems_by_id, read_traces, run_tasks
from ..tasks.selection import GraderChoice
from ..ui import note, progress_bar
from ..verify.grading import grade_traces
from .base import Stage


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
    cfg.bind_sets(problem_sets(run))  # the graders of the run's problem sets
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
