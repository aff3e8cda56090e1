"""Comparing candidate teachers by what a student would learn from them: the measurements that need
no model, the ranking, and the ranked table.

A teacher's own benchmark score is a poor guide to the student it produces: small students learn
better from shorter chains of thought and from teachers whose traces they already find likely (DED,
Mix Distillation). Per teacher, from its graded traces: verified accuracy (the share of correct
traces, the mean per-problem pass rate) and the teacher's own trace length; student_measures.py adds
the student's NLL of the correct traces and an optional proxy distillation. `rank` orders the
teachers (by proxy accuracy, the student's NLL, accuracy or length); a teacher with traces but no
correct one has nothing for the student to learn from, so it ranks last whatever the order.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter, defaultdict
from typing import Literal

from pydantic import Field, model_validator

from ..errors import UserError
from ..records import GradedTrace, Problem, TrainingExample
from ..train.hyperparameters import Hyperparameters, missing_inputs

RankBy = Literal["proxy_accuracy", "student_nll", "accuracy", "length"]
NO_CORRECT = "– (no correct traces)"  # the NLL and proxy cells of a teacher without a correct trace
RANK_LABELS = {
    "proxy_accuracy": "proxy accuracy (then student NLL)",
    "student_nll": "student NLL, lowest first",
    "accuracy": "verified accuracy (then student NLL)",
    "length": "trace length, shortest first (then student NLL)",
}


class ProxyOptions(Hyperparameters):
    """`select_teacher.proxy`: a short distillation of the student on each teacher's correct traces."""

    steps: int | None = Field(
        100,
        ge=1,
        description="optimizer steps per teacher, the same for every teacher (a fair comparison); "
        "null: `epochs` passes over each teacher's correct traces",
    )
    epochs: float = Field(1.0, gt=0, description="passes over a teacher's correct traces, when steps is null")
    problems: int = Field(
        100, ge=1, description="held-out test problems per task each proxy student is evaluated on (greedy)"
    )
    max_new_tokens: int = Field(4096, ge=1, description="completion token limit of the evaluation")
    eval_batch_size: int = Field(64, ge=1, description="sequences decoded together in the evaluation")

    @model_validator(mode="after")
    def _trainable(self) -> ProxyOptions:
        if self.steps is not None and "max_steps" in self.trainer_args:
            raise ValueError("set the proxy's steps, not trainer_args.max_steps")
        objective = self.objective_spec
        # the proxy trains on single correct traces alone: no teacher model, reference or sampling
        needs = (
            "a teacher" if objective.needs_teacher
            else "pairs" if objective.data == "pairs"
            else "the student's own samples" if objective.on_policy_only
            else "a reference model" if missing_inputs(objective, False, False)
            else None
        )  # fmt: skip
        if needs:
            raise ValueError(
                f"objective {objective.name!r} needs {needs}; the proxy trains on each teacher's correct "
                "traces alone (sft, or another objective without a teacher)"
            )
        return self

    def hyperparameters(self) -> Hyperparameters:
        hp = Hyperparameters(**self.model_dump(include=set(Hyperparameters.model_fields)))
        if self.steps is not None:
            hp.trainer_args = {**hp.trainer_args, "max_steps": self.steps}
        return hp


# ---- measurements ------------------------------------------------------------------------------


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), statistics.pstdev(values)


def _model_of(trace: GradedTrace) -> str | None:
    try:
        return json.loads(trace.source).get("model")
    except (json.JSONDecodeError, AttributeError):
        return None


def trace_statistics(graded: list[GradedTrace]) -> dict:
    """Verified accuracy and the teacher's own length figures of one graded trace set."""
    per_problem: dict[str, list[bool]] = defaultdict(list)
    for trace in graded:
        per_problem[trace.problem_id].append(trace.label == "correct")
    correct = sum(sum(labels) for labels in per_problem.values())
    teacher_mean, teacher_std = mean_std([float(t.completion_tokens) for t in graded])
    return {
        "model": _model_of(graded[0]),
        "traces": len(graded),
        "problems": len(per_problem),
        "correct": correct,
        "accuracy": correct / len(graded),
        "pass_rate": statistics.fmean(sum(labels) / len(labels) for labels in per_problem.values()),
        "solved": sum(any(labels) for labels in per_problem.values()) / len(per_problem),
        "labels": dict(Counter(t.label for t in graded)),
        "teacher_tokens_mean": teacher_mean,
        "teacher_tokens_std": teacher_std,
    }


def check_same_prompts(name: str, graded: dict[str, list[GradedTrace]]) -> None:
    """Teachers compared on different prompts are not compared at all: refuse, naming a difference."""
    ids = {teacher: {t.problem_id for t in traces} for teacher, traces in graded.items()}
    first, *others = graded
    for other in others:
        if ids[other] != ids[first]:
            extra = sorted(ids[other] - ids[first])
            missing = sorted(ids[first] - ids[other])
            difference = (
                f"{other} has {len(extra)} problem(s) {first} has not, e.g. {extra[0]!r}"
                if extra
                else f"{other} lacks {len(missing)} problem(s) of {first}, e.g. {missing[0]!r}"
            )
            raise UserError(
                f"select_teacher:{name}: teachers {first!r} and {other!r} answered different prompts "
                f"({difference}); generate every teacher on the same problems"
            )


def training_examples(graded: list[GradedTrace], problems: dict[str, Problem]) -> list[TrainingExample]:
    """A teacher's correct traces as the student would be trained on them (curate keep: [correct])."""
    return [
        TrainingExample(
            problem_id=t.problem_id,
            task=t.task,
            messages=problems[t.problem_id].messages,
            completion=t.completion,
            sample_idx=t.sample_idx,
        )
        for t in graded
        if t.label == "correct"
    ]


# ---- ranking -----------------------------------------------------------------------------------


def _ascending(value: float | None) -> float:
    return math.inf if value is None or math.isnan(value) else value


def rank(rows: list[dict], rank_by: RankBy) -> list[str]:
    """Teacher names, best first; a teacher without a correct trace ranks last, then a missing measurement,
    ties go to the lower NLL, then the name."""

    def primary(row: dict) -> float:
        if rank_by == "proxy_accuracy":
            accuracy = (row["proxy"] or {}).get("accuracy")
            return math.inf if accuracy is None else -accuracy
        if rank_by == "accuracy":
            return -row["accuracy"]
        if rank_by == "length":
            return _ascending(row["length_mean"])
        return _ascending(row["student_nll"])

    ordered = sorted(
        rows, key=lambda r: (no_correct(r), primary(r), _ascending(r["student_nll"]), r["teacher"])
    )
    return [r["teacher"] for r in ordered]


def no_correct(row: dict) -> bool:
    """A teacher with traces but no correct one: nothing for the student to learn from."""
    return row.get("correct") == 0
