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
"""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter, defaultdict
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator

from ..chat import completion_ids
from ..errors import UserError
from ..modelref import ResolvedModel, required_steps, resolve_model
from ..models import load_tokenizer
from ..objectives import IGNORE_INDEX, make_objective
from ..records import GradedTrace, Problem, TrainingExample, atomic_write_json, read_records
from ..rundir import RunDir
from ..stages import Stage
from ..tasks.stage import ProblemSelection, load_problems, problems_by_id
from ..train.data import CompletionCollator, tokenize_examples
from ..train.teachers import final_hidden_states, load_frozen, output_head
from ..train.trainer import Hyperparameters, missing_inputs, train_model
from ..ui import note, progress_bar
from ..verify.stage import GraderChoice
from .sets import graded_fingerprint, graded_requirement
from .stage import CurateConfig, run_curate

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
    max_new_tokens: int = Field(512, ge=1, description="completion token limit of the evaluation")
    eval_batch_size: int = Field(64, ge=1, description="sequences decoded together in the evaluation")

    @model_validator(mode="after")
    def _trainable(self) -> ProxyOptions:
        if self.steps is not None and "max_steps" in self.trainer_args:
            raise ValueError("set the proxy's steps, not trainer_args.max_steps")
        try:
            objective = make_objective(self.objective, self.objective_args)
        except UserError as err:
            raise ValueError(str(err)) from None
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


class SelectTeacherConfig(GraderChoice):
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
        2048, ge=8, description="tokens per scored sequence (prompt + completion); longer ones are cut"
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


# ---- measurements ------------------------------------------------------------------------------


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.no_grad()
def completion_nll(
    model: torch.nn.Module,
    tokenizer,
    examples: list[TrainingExample],
    batch_size: int,
    max_length: int,
    chunk_size: int = 512,
    progress=None,
) -> list[tuple[float, int]]:
    """(summed NLL in nats, completion tokens) of each example under `model`, in the examples' order.

    The tokens are those `train` computes its loss on (`tokenize_examples`: the chat-templated prompt,
    then the completion and the end-of-turn token; only completion positions count). Sequences are
    batched by length, right-padded, and projected to the vocabulary a chunk of positions at a time.
    """
    tokenized = tokenize_examples(tokenizer, examples, max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collate = CompletionCollator(pad)
    order = sorted(range(len(tokenized)), key=lambda i: len(tokenized[i].input_ids))
    device = next(model.parameters()).device
    results: list[tuple[float, int]] = [(0.0, 0)] * len(tokenized)
    for start in range(0, len(order), batch_size):
        indices = order[start : start + batch_size]
        batch = collate(
            [{"input_ids": tokenized[i].input_ids, "labels": tokenized[i].labels} for i in indices]
        )
        input_ids, attention = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        labels = batch["labels"][:, 1:].to(device)
        predicts = labels != IGNORE_INDEX  # position t predicts token t + 1
        head = output_head(model, final_hidden_states(model, input_ids, attention)[:, :-1][predicts], None)
        targets = labels[predicts]
        nll = torch.cat([
            torch.nn.functional.cross_entropy(
                head.logits(head.hidden[s : s + chunk_size]), targets[s : s + chunk_size], reduction="none"
            )
            for s in range(0, len(targets), chunk_size)
        ])  # fmt: skip
        summed = torch.zeros(len(indices), device=device, dtype=torch.float64)
        summed.index_add_(0, predicts.nonzero()[:, 0], nll.double())
        counts = predicts.sum(dim=1)
        for row, i in enumerate(indices):
            results[i] = (float(summed[row]), int(counts[row]))
        if progress is not None:
            progress(len(indices))
    return results


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
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
    teacher_mean, teacher_std = _mean_std([float(t.completion_tokens) for t in graded])
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


def student_statistics(
    student: ResolvedModel,
    graded: dict[str, list[GradedTrace]],
    problems: dict[str, Problem],
    cfg: SelectTeacherConfig,
) -> dict[str, dict]:
    """Per teacher: trace length in the student's tokens (all traces) and the student's NLL (correct ones)."""
    tokenizer = load_tokenizer(student.path)
    device = _device()
    dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    model = load_frozen(student.path, device, dtype)
    total = sum(sum(t.label == "correct" for t in traces) for traces in graded.values())
    stats = {}
    with progress_bar(f"student NLL ({student.name})", total=total, unit="traces") as bar:
        for teacher, traces in graded.items():
            encoded = completion_ids(tokenizer, [t.completion for t in traces])  # with the end of turn
            length_mean, length_std = _mean_std([float(len(ids)) for ids in encoded])
            scored = completion_nll(
                model, tokenizer, training_examples(traces, problems), cfg.batch_size, cfg.max_length,
                progress=bar.advance,
            )  # fmt: skip
            tokens = sum(count for _, count in scored)
            stats[teacher] = {
                "length_mean": length_mean,
                "length_std": length_std,
                "nll_tokens": tokens,
                "student_nll": sum(nll for nll, _ in scored) / tokens if tokens else None,
            }
    del model
    return stats


def _proxy_dir(run: RunDir, name: str) -> RunDir:
    """teacher-selection/<name>/ laid out like a run (checkpoints/, eval/): proxy students and their
    evaluations stay out of the run's own checkpoints and report."""
    return RunDir(run.teacher_selection(name).with_suffix(""))


def proxy_distillation(
    teacher: str,
    examples: list[TrainingExample],
    student: ResolvedModel,
    test_problems: dict[str, list[Problem]],
    cfg: SelectTeacherConfig,
    run: RunDir,
    step_fingerprint: str,
) -> dict:
    """Train the student on one teacher's correct traces and evaluate it greedily on held-out problems.

    A finished teacher is recorded in teacher-selection/<name>/proxy/<teacher>.json with the step's
    fingerprint, so an interrupted step resumes with the next teacher.
    """
    from ..evaluate.stage import EvalConfig, evaluate_model  # evaluate imports generate, a heavy import

    proxy, workspace = cfg.proxy, _proxy_dir(run, cfg.name)
    record = workspace.root / "proxy" / f"{teacher}.json"
    if record.exists():
        previous = json.loads(record.read_text())
        if previous.get("fingerprint") == step_fingerprint:
            note(f"select_teacher:{cfg.name}: proxy student of {teacher} finished earlier, reused")
            return previous["result"]
    if not examples:
        note(f"select_teacher:{cfg.name}: no proxy student for {teacher}: it has no correct traces")
        result = {"accuracy": None, "by_task": {}, "examples": 0, "note": "no correct traces to train on"}
        atomic_write_json(record, {"fingerprint": step_fingerprint, "result": result})
        return result
    hp = proxy.hyperparameters()
    note(f"select_teacher:{cfg.name}: proxy distillation on {teacher}: {len(examples)} correct traces")
    training = train_model(
        Path(student.path), examples, workspace.checkpoint(teacher), hp,
        grader_for=cfg.grader_for, description=f"select_teacher:{cfg.name}:{teacher}",
        resume_key=f"{step_fingerprint}-{teacher}",
    )  # fmt: skip
    eval_cfg = EvalConfig(
        models=[teacher], n=0, greedy=True, max_new_tokens=proxy.max_new_tokens,
        batch_size=proxy.eval_batch_size, graders=cfg.graders,
    )  # fmt: skip
    model = ResolvedModel(teacher, str(workspace.checkpoint(teacher)), step_fingerprint)
    evaluation = evaluate_model(model, test_problems, eval_cfg, workspace)
    by_task = {task: acc["greedy"] for task, acc in evaluation["accuracy"].items()}
    counts = {task: len(problems) for task, problems in test_problems.items()}
    result = {
        "accuracy": sum(by_task[t] * counts[t] for t in by_task) / sum(counts.values()),
        "by_task": by_task,
        "problems": counts,
        "examples": len(examples),
        "steps": training["steps"],
        "train_loss": training["train_loss"],
        "seconds": training["seconds"],
    }
    atomic_write_json(record, {"fingerprint": step_fingerprint, "result": result})
    return result


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
        rows, key=lambda r: (_no_correct(r), primary(r), _ascending(r["student_nll"]), r["teacher"])
    )
    return [r["teacher"] for r in ordered]


def _no_correct(row: dict) -> bool:
    """A teacher with traces but no correct one: nothing for the student to learn from."""
    return row.get("correct") == 0


def check_some_correct(cfg: SelectTeacherConfig, graded: dict[str, list[GradedTrace]]) -> None:
    """With curate_winner, refuse before anything is written when no teacher has a correct trace."""
    if cfg.curate_winner and not any(t.label == "correct" for traces in graded.values() for t in traces):
        sets = ", ".join(f"graded/{teacher}" for teacher in graded)
        raise UserError(
            f"select_teacher:{cfg.name}: no teacher has a correct trace ({sets}), so curate_winner "
            f"{cfg.curate_winner!r} would be an empty training set; generate more traces or drop curate_winner"
        )


def proxy_test_problems(
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


def select_teachers(
    cfg: SelectTeacherConfig, run: RunDir, student: ResolvedModel, step_fingerprint: str
) -> dict:
    graded = {teacher: read_records(run.graded(teacher), GradedTrace) for teacher in cfg.teachers}
    for teacher, traces in graded.items():
        if not traces:
            raise UserError(f"select_teacher:{cfg.name}: graded/{teacher} holds no traces")
    check_same_prompts(cfg.name, graded)
    check_some_correct(cfg, graded)
    test_problems = proxy_test_problems(cfg, run, graded) if cfg.proxy else None
    problems = problems_by_id(run)
    rows = {teacher: {"teacher": teacher, **trace_statistics(traces)} for teacher, traces in graded.items()}
    for teacher, stats in student_statistics(student, graded, problems, cfg).items():
        rows[teacher].update(stats)
    for row in rows.values():
        row["proxy"] = None
    if test_problems is not None:
        for teacher in cfg.teachers:
            examples = training_examples(graded[teacher], problems)
            rows[teacher]["proxy"] = proxy_distillation(
                teacher, examples, student, test_problems, cfg, run, step_fingerprint
            )
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
    student = resolve_model(cfg.student, run)
    inputs: dict = {f"graded:{teacher}": graded_fingerprint(run, teacher) for teacher in cfg.teachers}
    inputs["student"] = student.fingerprint
    if cfg.proxy:
        inputs["problems"] = run.finished_step("problems")["fingerprint"]

    def body(step_fingerprint: str) -> dict:
        result = select_teachers(cfg, run, student, step_fingerprint)
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


# ---- report ------------------------------------------------------------------------------------


def _format(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _nll_cell(row: dict) -> str:
    return NO_CORRECT if _no_correct(row) else _format(row["student_nll"], ".3f")


def _proxy_cell(row: dict, accuracy: float | None) -> str:
    return NO_CORRECT if _no_correct(row) else _percent(accuracy)


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
            str(row["rank"]), teacher, str(row["traces"]), _percent(row["accuracy"]), _percent(row["pass_rate"]),
            _spread(row["length_mean"], row["length_std"]),
            _spread(row["teacher_tokens_mean"], row["teacher_tokens_std"]),
            _nll_cell(row),
            *([_proxy_cell(row, (row["proxy"] or {}).get("accuracy"))] if with_proxy else []),
        ])  # fmt: skip
    return headers, rows


def report_sections(run: RunDir) -> list[tuple[str, tuple[list[str], list[list[str]]]]]:
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
)
