"""`verify`: grade every trace with its task's grader → correct / incorrect / unparseable."""

from __future__ import annotations

from collections import Counter, defaultdict

from pydantic import Field

from ..errors import UserError
from ..generate.stage import trace_shards
from ..records import GradedTrace, Problem, Trace, read_records, write_records
from ..rundir import RunDir
from ..stages import Stage, StageConfig
from ..tasks import get_task
from ..tasks.stage import problems_by_id
from ..ui import note, progress_bar


class VerifyConfig(StageConfig):
    traces: str = Field(
        description="name of the traces to grade (traces/<name>); the output is graded/<name>"
    )


def grade_trace(trace: Trace, problem: Problem) -> GradedTrace:
    grader = get_task(problem.task).grader
    verdict = grader.grade(trace.completion, problem, trace.finish_reason)
    return GradedTrace(
        **trace.model_dump(), label=verdict.label, extracted=verdict.extracted, grader=grader.id
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
    }

    def body(_fingerprint: str) -> dict:
        problems = problems_by_id(run)
        shards = trace_shards(run.traces(cfg.traces))
        graded = []
        with progress_bar(f"verify {cfg.traces}", total=len(shards), unit="shards") as bar:
            for shard in shards:
                for row, trace in enumerate(read_records(shard, Trace)):
                    if trace.problem_id not in problems:
                        raise UserError(
                            f"{shard} row {row}: problem_id {trace.problem_id!r} is not a problem of this run"
                        )
                    graded.append(grade_trace(trace, problems[trace.problem_id]))
                bar.advance(1)
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
