"""Evaluate one model on problems, graded like `verify` grades.

For each task or benchmark: greedy accuracy, and over n samples at a temperature pass@1 (the mean
over samples), unbiased pass@k, maj@k, mean and median completion tokens, correct answers per 1k
generated tokens and accuracy by difficulty (metrics.py). Where the grader is strict (GSM8K's
`numeric`: `\boxed{}`, `#### N`, "the answer is N"), the completions are graded a second time by its
flexible twin (the last number as well), as lm-eval-harness reports strict-match beside
flexible-extract, so that a model answering `A: 18` is not silently scored zero; the share of
unparseable completions is reported, and warned about above 10%. The `eval` stage runs this for each
model it is given; `select_teacher` runs it for each proxy student.

Any backend evaluates (`hf`, `openai`, `vllm`: the `generate` stage's options). Every problem's samples
are seeded by the problem alone (`row_seed`), so the backends that seed each request (openai, vllm)
give a problem the same samples whatever else is evaluated with it.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from ..errors import UserError
from ..generate.backends import BackendOptions, open_generator
from ..generate.base import Completion, Failure, Generator, SamplingParams, make_traces, row_seed
from ..generate.sampling import SamplingOptions
from ..modelref import ResolvedModel
from ..records import GradedTrace, Problem, atomic_write_json, write_records
from ..tasks import BENCHMARKS, TASKS
from ..tasks.selection import BenchmarkSelection, GraderChoice
from ..ui import progress_bar
from ..verify.graders import Grader
from ..verify.grading import grade_traces
from .metrics import UNPARSEABLE_WARNING, summarise

log = logging.getLogger(__name__)


class EvalOptions(SamplingOptions, BenchmarkSelection, GraderChoice, BackendOptions):
    """How a model is evaluated: the backend that runs it, its decoding modes, each task's grader, and
    where the problems came from (for the results' description)."""

    split: Literal["train", "test"] = Field("test", description="which testbed problems to evaluate on")
    n: int = Field(4, ge=0, description="sampled completions per problem (0: greedy only)")
    greedy: bool = Field(True, description="also decode greedily (one completion at temperature 0)")

    @model_validator(mode="after")
    def _every_completion_is_graded(self) -> EvalOptions:
        if self.allow_failures:
            raise ValueError(
                "allow_failures: eval grades every completion; a failed request would change the "
                "accuracy, so eval stops on one instead (a rerun asks again)"
            )
        return self


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
    returns the model's path, its accuracy by task and mode, and what the backend spent.

    `model.path`: what from_pretrained receives, or for the openai backend the served model's name."""
    modes = _modes(options)
    started = time.monotonic()
    generator = open_generator(options, model.path, options.batch_size, top_logprobs=0)
    try:
        parameters = generator.parameter_count()
        accuracy = {}
        total = sum(len(task_problems) * s.n for task_problems in problems.values() for _, s in modes)
        with progress_bar(f"eval {model.name}", total=total, unit="completions") as bar:
            for task, task_problems in problems.items():
                result = {
                    "model": model.name, "path": model.path, "backend": options.backend,
                    "parameters": parameters, "task": task, "data": _data_description(task, options),
                    "grader": options.grader_for(task).id, "difficulty": options.difficulty_label(task),
                }  # fmt: skip
                for mode, sampling in modes:
                    completions = _complete(generator, task_problems, sampling, bar.advance)
                    source = {"model": model.name, "backend": options.backend, "sampling": asdict(sampling)}
                    graded, result[mode] = _grade_mode(
                        task_problems, completions, json.dumps(source), options, task, sampling
                    )
                    write_records(out / f"{task}.{mode}.parquet", graded, GradedTrace)
                    _warn_unparseable(model.name, task, mode, result[mode])
                atomic_write_json(out / f"{task}.json", result)
                accuracy[task] = {mode: round(result[mode]["accuracy"], 4) for mode, _ in modes}
        usage = {
            "backend": options.backend, **asdict(generator.usage), "recovered_by_rerun": 0,
            "seconds": round(time.monotonic() - started, 2), "cost": options.pricing.cost(generator.usage),
            "failed": [],  # a failed request stops the evaluation (see `_complete`)
        }  # fmt: skip
    finally:
        generator.close()
    return {"model": model.path, "accuracy": accuracy, "usage": usage}


def _grade_mode(
    problems: list[Problem],
    completions: list[list[Completion]],
    source: str,
    options: EvalOptions,
    task: str,
    sampling: SamplingParams,
) -> tuple[list[GradedTrace], dict]:
    """The graded completions of one mode and their metrics (with the flexible twin's, if any)."""
    grader = options.grader_for(task)
    traces = [
        make_traces(problem, samples, source) for problem, samples in zip(problems, completions, strict=True)
    ]
    sizes = [len(ts) for ts in traces]
    graded = _grade(problems, traces, grader)
    summary = {
        "temperature": sampling.temperature,
        **summarise(_regroup(graded, sizes), [p.difficulty for p in problems]),
    }
    flexible = grader.flexible()
    if flexible is not None:
        summary["flexible"] = _flexible(_regroup(_grade(problems, traces, flexible), sizes), flexible)
    return graded, summary


def _complete(
    generator: Generator, problems: list[Problem], sampling: SamplingParams, progress
) -> list[list[Completion]]:
    """`sampling.n` completions of each problem, each problem's samples seeded by the problem alone; a
    request that failed after its retries stops the evaluation (its accuracy would be wrong)."""
    seeds = [row_seed(sampling.seed, problem.id, 0) for problem in problems]
    results = generator.generate([p.messages for p in problems], sampling, progress, seeds=seeds)
    for problem, completions in zip(problems, results, strict=True):
        failure = next((c for c in completions if isinstance(c, Failure)), None)
        if failure is not None:
            failed = sum(isinstance(c, Failure) for row in results for c in row)
            raise UserError(
                f"eval: {failed} request(s) failed after their retries, e.g. problem {problem.id} "
                f"({failure.attempts} attempts: {failure.error}); rerun the step to ask again"
            )
    return results


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
