"""`select_teacher`: compare candidate teachers by what the student would learn from them.

A teacher's own benchmark score is a poor guide to the student it produces: small students learn
better from shorter chains of thought and from teachers whose traces they already find likely (DED,
Mix Distillation). For teachers that answered the same prompts (any backends: `generate` + `verify`
of each), this stage measures per teacher

- verified accuracy: the share of correct traces, and the mean per-problem pass rate;
- trace length over all its traces: mean and spread in the student's tokens (end-of-turn token
  included) and in the teacher's own count (`completion_tokens`);
- the student's mean per-token negative log-likelihood of the teacher's correct traces (prompt and
  completion tokenized with the student's tokenizer and chat template, as `train` tokenizes them;
  the end-of-turn token included);
- optionally a proxy distillation: the student trained briefly from its initial weights on the
  teacher's correct traces (the same optimizer steps for every teacher), then greedy accuracy on
  the run's held-out test problems, graded by each task's grader.

The teachers are ranked (by proxy accuracy when there is one, otherwise by the student's NLL) into
teacher-selection/<name>.json; the proxy students and their evaluations sit beside it in
teacher-selection/<name>/. `curate_winner` also writes the winner's correct traces as a curated set.

A teacher with traces but no correct one has nothing for the student to learn from: it gets no NLL
and no proxy student (the table says "no correct traces"), and it ranks last whatever `rank_by`. If
no teacher has a correct trace, `curate_winner` stops the step before anything is written: the
winner's curated set would be empty.

The measurements, the ranking and the table are curate/teacher_selection.py's and (those that need
the student's weights) curate/student_measures.py's; this module reads the run and writes the result.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict

from pydantic import Field, model_validator

from ..curate.teacher_selection import (
    NO_CORRECT,
    RANK_LABELS,
    ProxyOptions,
    RankBy,
    check_same_prompts,
    no_correct,
    rank,
    trace_statistics,
    training_examples,
)
from ..errors import UserError
from ..modelref import ResolvedModel, required_steps, resolve_model
from ..models import ModelLoading
from ..records import GradedTrace, Problem, atomic_write_json, read_records
from ..report.tables import number, percent
from ..rundir import RunDir
from ..store import graded_fingerprint, graded_requirement, load_problems, problem_sets, problems_by_id
from ..tasks.selection import GraderChoice, ProblemSelection
from ..ui import note
from .base import Section, Stage

# curate_winner runs the curate step on the winner's traces: the one stage adapter another imports
# (allowed by the stages-independent contract in pyproject.toml).
from .curate import CurateConfig, run_curate


class SelectTeacherConfig(GraderChoice, ModelLoading):
    name: str = Field("teachers", description="output name: teacher-selection/<name>.json")
    teachers: list[str] = Field(
        min_length=1,
        description="graded traces of the candidate teachers (graded/<name>), all answering the same problems",
    )
    student: str = Field(
        description="the student: testbed:student, a model trained in this run, a model folder or a Hub id"
    )
    batch_size: int = Field(16, ge=1, description="sequences per forward pass when scoring the student's NLL")
    max_length: int = Field(
        4096, ge=8, description="tokens per scored sequence (prompt + completion); longer ones are cut"
    )
    proxy: ProxyOptions | None = Field(
        None,
        description="proxy distillation: train the student briefly on "
        "each teacher's correct traces and evaluate it on held-out problems; options: steps, problems, "
        "max_new_tokens, eval_batch_size and those of train (learning_rate, batch_size, …)",
    )
    rank_by: RankBy | None = Field(
        None,
        description="proxy_accuracy, student_nll, accuracy or length (default: proxy_accuracy with a proxy, "
        "else student_nll); ties go to the lower student NLL",
    )
    curate_winner: str | None = Field(
        None,
        description="also write the winner's correct traces as curated/<name> (a `curate` step) for `train`",
    )

    @model_validator(mode="after")
    def _consistent(self) -> SelectTeacherConfig:
        duplicated = [t for t, count in Counter(self.teachers).items() if count > 1]
        if duplicated:
            raise ValueError(f"teacher {duplicated[0]!r} is listed twice")
        if self.rank_by == "proxy_accuracy" and self.proxy is None:
            raise ValueError("rank_by proxy_accuracy needs proxy options")
        return self

    def ranking(self) -> RankBy:
        return self.rank_by or ("proxy_accuracy" if self.proxy else "student_nll")


def _proxy_dir(run: RunDir, name: str) -> RunDir:
    """teacher-selection/<name>/ laid out like a run (checkpoints/, eval/): proxy students and their
    evaluations stay out of the run's own checkpoints and report."""
    return RunDir(run.teacher_selection(name).with_suffix(""))


def _check_some_correct(cfg: SelectTeacherConfig, graded: dict[str, list[GradedTrace]]) -> None:
    """With curate_winner, refuse before anything is written when no teacher has a correct trace."""
    if cfg.curate_winner and not any(t.label == "correct" for traces in graded.values() for t in traces):
        sets = ", ".join(f"graded/{teacher}" for teacher in graded)
        raise UserError(
            f"select_teacher:{cfg.name}: no teacher has a correct trace ({sets}), so curate_winner "
            f"{cfg.curate_winner!r} would be an empty training set; generate more traces or drop curate_winner"
        )


def _proxy_test_problems(
    cfg: SelectTeacherConfig, run: RunDir, graded: dict[str, list[GradedTrace]]
) -> dict[str, list[Problem]]:
    """The held-out problems each proxy student is evaluated on, by task: never one a teacher answered."""
    tasks = sorted({t.task for traces in graded.values() for t in traces})
    selection = ProblemSelection(tasks=tasks, limit=cfg.proxy.problems)
    test_problems: dict[str, list[Problem]] = defaultdict(list)
    for problem in load_problems(run, selection, "test", step=f"select_teacher:{cfg.name}: proxy"):
        test_problems[problem.task].append(problem)
    overlap = {t.problem_id for t in graded[cfg.teachers[0]]} & {
        p.id for ps in test_problems.values() for p in ps
    }
    if overlap:
        raise UserError(
            f"select_teacher:{cfg.name}: the teachers answered {len(overlap)} test problem(s) "
            f"(e.g. {sorted(overlap)[0]!r}); the proxy students are evaluated on them: generate on the train split"
        )
    return dict(test_problems)


def _select_teachers(
    cfg: SelectTeacherConfig, run: RunDir, student: ResolvedModel, step_fingerprint: str
) -> dict:
    from ..curate.student_measures import proxy_distillation, student_statistics  # torch, transformers

    graded = {teacher: read_records(run.graded(teacher), GradedTrace) for teacher in cfg.teachers}
    for teacher, traces in graded.items():
        if not traces:
            raise UserError(f"select_teacher:{cfg.name}: graded/{teacher} holds no traces")
    check_same_prompts(cfg.name, graded)
    _check_some_correct(cfg, graded)
    test_problems = _proxy_test_problems(cfg, run, graded) if cfg.proxy else None
    problems = problems_by_id(run)
    rows = {teacher: {"teacher": teacher, **trace_statistics(traces)} for teacher, traces in graded.items()}
    for teacher, stats in student_statistics(
        student, graded, problems, cfg.batch_size, cfg.max_length, cfg
    ).items():
        rows[teacher].update(stats)
    for row in rows.values():
        row["proxy"] = None
    if test_problems is not None:
        for teacher in cfg.teachers:
            examples = training_examples(graded[teacher], problems)
            rows[teacher]["proxy"] = proxy_distillation(
                teacher, examples, student, test_problems, cfg.proxy, cfg, _proxy_dir(run, cfg.name),
                step_fingerprint, step=f"select_teacher:{cfg.name}", loading=cfg,
            )  # fmt: skip
    ranking = rank(list(rows.values()), cfg.ranking())
    for position, teacher in enumerate(ranking, start=1):
        rows[teacher]["rank"] = position
    return {
        "name": cfg.name,
        "student": cfg.student,
        "student_path": student.path,
        "rank_by": cfg.ranking(),
        "ranking": ranking,
        "winner": ranking[0],
        "teachers": [rows[teacher] for teacher in cfg.teachers],
    }


def run_select_teacher(cfg: SelectTeacherConfig, run: RunDir, overwrite: bool) -> None:
    cfg.bind_sets(problem_sets(run))  # the graders of the run's problem sets
    student = resolve_model(cfg.student, run)
    inputs: dict = {f"graded:{teacher}": graded_fingerprint(run, teacher) for teacher in cfg.teachers}
    inputs["student"] = student.fingerprint
    if cfg.proxy:
        inputs["problems"] = run.finished_step("problems")["fingerprint"]

    def body(step_fingerprint: str) -> dict:
        result = _select_teachers(cfg, run, student, step_fingerprint)
        atomic_write_json(run.teacher_selection(cfg.name), result)
        summary = {
            row["teacher"]: {
                key: row[key]
                for key in ("rank", "accuracy", "correct", "pass_rate", "length_mean", "student_nll")
            }
            | ({"proxy_accuracy": row["proxy"]["accuracy"]} if row["proxy"] else {})
            for row in result["teachers"]
        }
        return {"rank_by": result["rank_by"], "ranking": result["ranking"], "teachers": summary}

    outputs = [run.teacher_selection(cfg.name)]
    result = run.step(f"select_teacher:{cfg.name}", cfg, inputs, body, outputs=outputs, overwrite=overwrite)
    stats = result["stats"]
    lines = [
        f"{row['rank']}. {teacher}: accuracy {100 * row['accuracy']:.1f}%, length {row['length_mean']:.1f}, "
        f"student NLL {_nll_cell(row)}"
        + (f", proxy {_proxy_cell(row, row['proxy_accuracy'])}" if "proxy_accuracy" in row else "")
        for teacher, row in sorted(stats["teachers"].items(), key=lambda item: item[1]["rank"])
    ]
    note(f"select_teacher:{cfg.name}: ranked by {stats['rank_by']}: " + "; ".join(lines))
    if cfg.curate_winner:
        run_curate(
            CurateConfig(name=cfg.curate_winner, traces=stats["ranking"][0], keep=["correct"]), run, overwrite
        )


# ---- the ranked table --------------------------------------------------------------------------


def _nll_cell(row: dict) -> str:
    return NO_CORRECT if no_correct(row) else number(row["student_nll"], 3)


def _proxy_cell(row: dict, accuracy: float | None) -> str:
    return NO_CORRECT if no_correct(row) else percent(accuracy)


def _spread(mean: float | None, std: float | None) -> str:
    return "–" if mean is None else f"{mean:.1f} ± {std:.1f}"


def selection_table(result: dict) -> tuple[list[str], list[list[str]]]:
    """The ranked table of one teacher-selection result (headers, rows of strings)."""
    with_proxy = any(row["proxy"] for row in result["teachers"])
    headers = [
        "rank", "teacher", "traces", "verified acc.", "pass rate", "length (student tokens)",
        "length (teacher tokens)", "student NLL/token", *(["proxy acc. (greedy)"] if with_proxy else []),
    ]  # fmt: skip
    by_name = {row["teacher"]: row for row in result["teachers"]}
    rows = []
    for teacher in result["ranking"]:
        row = by_name[teacher]
        rows.append([
            str(row["rank"]), teacher, str(row["traces"]), percent(row["accuracy"]), percent(row["pass_rate"]),
            _spread(row["length_mean"], row["length_std"]),
            _spread(row["teacher_tokens_mean"], row["teacher_tokens_std"]),
            _nll_cell(row),
            *([_proxy_cell(row, (row["proxy"] or {}).get("accuracy"))] if with_proxy else []),
        ])  # fmt: skip
    return headers, rows


def report_sections(run: RunDir) -> list[Section]:
    """One ranked table per teacher-selection result of the run, for report.md / report.html."""
    sections = []
    for path in sorted((run.root / "teacher-selection").glob("*.json")):
        result = json.loads(path.read_text())
        heading = (
            f"Teacher selection: {result['name']} (student {result['student']}; "
            f"ranked by {RANK_LABELS[result['rank_by']]})"
        )
        sections.append((heading, selection_table(result)))
    return sections


STAGE = Stage(
    "select_teacher",
    SelectTeacherConfig,
    run_select_teacher,
    "rank candidate teachers by accuracy, trace length, the student's NLL and a proxy distillation",
    produces=lambda cfg: [
        f"select_teacher:{cfg.name}",
        *([f"curate:{cfg.curate_winner}"] if cfg.curate_winner else []),
    ],
    requires=lambda cfg: {
        **{
            f"teachers[{i}]" if len(cfg.teachers) > 1 else "teachers": graded_requirement(teacher)
            for i, teacher in enumerate(cfg.teachers)
        },
        **required_steps("student", [cfg.student]),
        **({"proxy": "problems"} if cfg.proxy else {}),
    },
    report_sections=report_sections,
)
