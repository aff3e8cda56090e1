"""Evaluate one model on problems, graded like `verify` grades.

For each task or benchmark: greedy accuracy, and over n samples at a temperature pass@1 (the mean
over samples), unbiased pass@k, maj@k, mean and median completion tokens, correct answers per 1k
generated tokens and accuracy by difficulty (metrics.py). Where the grader is strict (GSM8K's
`numeric`: `\boxed{}`, `#### N`, "the answer is N"), the completions are graded a second time by its
flexible twin (the last number as well), as lm-eval-harness reports strict-match beside
flexible-extract, so that a model answering `A: 18` is not silently scored zero; the share of
unparseable completions is reported, and warned about above 10%. The `eval` stage runs this for each
model it is given; `select_teacher` runs it for each proxy student.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Literal

from pydantic import Field

from ..errors import UserError
from ..generate.base import SamplingParams, make_traces
from ..generate.sampling import SamplingOptions
from ..modelref import ResolvedModel
from ..models import ModelLoading
from ..records import GradedTrace, Problem, atomic_write_json, write_records
from ..tasks import BENCHMARKS, TASKS
from ..tasks.selection import BenchmarkSelection, GraderChoice
from ..ui import progress_bar
from ..verify.graders import Grader
from ..verify.grading import grade_traces
from .metrics import UNPARSEABLE_WARNING, summarise

log = logging.getLogger(__name__)


class EvalOptions(SamplingOptions, BenchmarkSelection, GraderChoice, ModelLoading):
    """How a model is evaluated: its decoding modes, each task's grader, and where the problems came
    from (for the results' description)."""

    split: Literal["train", "test"] = Field("test", description="which testbed problems to evaluate on")
    n: int = Field(4, ge=0, description="sampled completions per problem (0: greedy only)")
    greedy: bool = Field(True, description="also decode greedily (one completion at temperature 0)")


def _modes(options: EvalOptions) -> list[tuple[str, SamplingParams]]:
    modes = [("greedy", options.sampling(1, 0.0, options.seed))] if options.greedy else []
    if options.n:
        modes.append(("sampled", options.sampling(options.n, options.temperature, options.seed)))
    if not modes:
        raise UserError("eval: nothing to do; set greedy: true or n >= 1")
    return modes


def evaluate_model(
    model: ResolvedModel, problems: dict[str, list[Problem]], options: EvalOptions, out: Path
) -> dict:
    """Generate, grade and summarise `model`'s completions of `problems` (by task) in every mode. Writes
    out/<task>.json (the metrics) and out/<task>.<greedy|sampled>.parquet (the graded completions);
    returns the model's path and its accuracy by task and mode."""
    from ..generate.hf import HFGenerator  # torch and transformers: imported when a model is evaluated

    generator = HFGenerator(model.path, batch_size=options.batch_size, **options.loading())
    parameters = sum(p.numel() for p in generator.model.parameters())
    modes = _modes(options)
    accuracy = {}
    total = sum(len(task_problems) * s.n for task_problems in problems.values() for _, s in modes)
    with progress_bar(f"eval {model.name}", total=total, unit="completions") as bar:
        for task, task_problems in problems.items():
            grader = options.grader_for(task)
            flexible = grader.flexible()
            result = {
                "model": model.name, "path": model.path, "parameters": parameters, "task": task,
                "data": _data_description(task, options), "grader": grader.id,
                "difficulty": options.difficulty_label(task),
            }  # fmt: skip
            for mode, sampling in modes:
                source = json.dumps({"model": model.name, "backend": "hf", "sampling": asdict(sampling)})
                completions = generator.generate(
                    [p.messages for p in task_problems], sampling, progress=bar.advance
                )
                traces = [
                    make_traces(problem, samples, source)
                    for problem, samples in zip(task_problems, completions, strict=True)
                ]
                sizes = [len(ts) for ts in traces]
                graded = _grade(task_problems, traces, grader)
                per_problem = _regroup(graded, sizes)
                write_records(out / f"{task}.{mode}.parquet", graded, GradedTrace)
                result[mode] = {
                    "temperature": sampling.temperature,
                    **summarise(per_problem, [p.difficulty for p in task_problems]),
                }
                if flexible is not None:
                    result[mode]["flexible"] = _flexible(
                        _regroup(_grade(task_problems, traces, flexible), sizes), flexible
                    )
                _warn_unparseable(model.name, task, mode, result[mode])
            atomic_write_json(out / f"{task}.json", result)
            accuracy[task] = {mode: round(result[mode]["accuracy"], 4) for mode, _ in modes}
    return {"model": model.path, "accuracy": accuracy}


def _grade(problems: list[Problem], traces: list[list], grader: Grader) -> list[GradedTrace]:
    return grade_traces(
        [(t, problem, grader) for problem, ts in zip(problems, traces, strict=True) for t in ts]
    )


def _flexible(per_problem: list[list[GradedTrace]], grader: Grader) -> dict:
    """Accuracy and unparseable share under the flexible twin of the task's grader."""
    summary = summarise(per_problem)
    return {
        "grader": grader.id,
        "accuracy": summary["accuracy"],
        "unparseable_share": summary["unparseable_share"],
    }


def _warn_unparseable(model: str, task: str, mode: str, summary: dict) -> None:
    share = summary["unparseable_share"]
    if share > UNPARSEABLE_WARNING:
        flexible = summary.get("flexible")
        log.warning(
            "eval %s on %s (%s): %.0f%% of completions have no answer the grader reads%s; the model may "
            "answer in another format (see the graded completions in the run's eval folder)",
            model, task, mode, 100 * share,
            f" (flexible extraction, the last number: {100 * flexible['accuracy']:.1f}% correct)" if flexible else "",
        )  # fmt: skip


def _regroup(items: list, sizes: list[int]) -> list[list]:
    """`items` cut into consecutive groups of `sizes` (the graded samples of each problem)."""
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [items[start : start + size] for start, size in zip(starts, sizes, strict=True)]


def _data_description(task: str, options: EvalOptions) -> str:
    benchmark = BENCHMARKS.get(task)
    if benchmark is not None:
        config = f" {benchmark.hub_config}" if benchmark.hub_config else ""
        return options.data_files().get(task) or f"{benchmark.source}{config} ({benchmark.split})"
    return f"{'testbed' if task in TASKS else 'problem set'} {options.split} split"
