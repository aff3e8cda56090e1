"""`eval`: models on held-out testbed problems and public benchmarks, graded like `verify` grades.

For each model and task or benchmark: greedy accuracy, and over n samples at a temperature pass@1
(the mean over samples), unbiased pass@k, maj@k, mean and median completion tokens, correct answers
per 1k generated tokens and accuracy by difficulty. Results go to eval/<model>/<task>.json, the
graded completions to eval/<model>/<task>.<greedy|sampled>.parquet.

    reasondistill eval --model PATH --benchmarks gsm8k,math500 --n 8 --temperature 0.6 --limit 50
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict
from typing import Literal

from pydantic import AliasChoices, Field

from ..errors import UserError
from ..generate.base import SamplingParams
from ..generate.hf import HFGenerator
from ..generate.stage import SamplingOptions, make_traces
from ..modelref import ResolvedModel, reference_name, required_steps, resolve_model
from ..records import GradedTrace, Problem, atomic_write_json, write_records
from ..rundir import RunDir
from ..stages import Stage
from ..tasks import BENCHMARKS, task_or_benchmark
from ..tasks.stage import (
    BenchmarkSelection,
    ProblemSelection,
    benchmark_inputs,
    load_benchmarks,
    load_problems,
)
from ..ui import note, progress_bar
from ..verify.grading import grade_traces
from ..verify.stage import GraderChoice
from .metrics import summarise


class EvalConfig(SamplingOptions, ProblemSelection, BenchmarkSelection, GraderChoice):
    models: list[str] = Field(
        min_length=1,
        validation_alias=AliasChoices("models", "model"),
        description="models to evaluate (testbed:…, trained names, folders, Hub ids)",
    )
    split: Literal["train", "test"] = Field("test", description="which testbed problems to evaluate on")
    n: int = Field(4, ge=0, description="sampled completions per problem (0: greedy only)")
    greedy: bool = Field(True, description="also decode greedily (one completion at temperature 0)")

    def uses_run_problems(self) -> bool:
        """Testbed problems of the run are evaluated unless only benchmarks were asked for."""
        return not self.benchmarks or self.tasks is not None


def _modes(cfg: EvalConfig) -> list[tuple[str, SamplingParams]]:
    modes = [("greedy", cfg.sampling(1, 0.0, cfg.seed))] if cfg.greedy else []
    if cfg.n:
        modes.append(("sampled", cfg.sampling(cfg.n, cfg.temperature, cfg.seed)))
    if not modes:
        raise UserError("eval: nothing to do; set greedy: true or n >= 1")
    return modes


def evaluate_model(
    model: ResolvedModel, problems: dict[str, list[Problem]], cfg: EvalConfig, run: RunDir
) -> dict:
    generator = HFGenerator(model.path, batch_size=cfg.batch_size)
    parameters = sum(p.numel() for p in generator.model.parameters())
    modes = _modes(cfg)
    out = run.eval_dir(model.name)
    accuracy = {}
    total = sum(len(task_problems) * s.n for task_problems in problems.values() for _, s in modes)
    with progress_bar(f"eval {model.name}", total=total, unit="completions") as bar:
        for task, task_problems in problems.items():
            grader = cfg.grader_for(task)
            result = {
                "model": model.name, "path": model.path, "parameters": parameters, "task": task,
                "data": _data_description(task, cfg), "grader": grader.id,
                "difficulty": task_or_benchmark(task).difficulty_label,
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
                graded = grade_traces(
                    [
                        (t, problem, grader)
                        for problem, ts in zip(task_problems, traces, strict=True)
                        for t in ts
                    ]
                )
                per_problem = _regroup(graded, [len(ts) for ts in traces])
                write_records(out / f"{task}.{mode}.parquet", graded, GradedTrace)
                result[mode] = {
                    "temperature": sampling.temperature,
                    **summarise(per_problem, [p.difficulty for p in task_problems]),
                }
            atomic_write_json(out / f"{task}.json", result)
            accuracy[task] = {mode: round(result[mode]["accuracy"], 4) for mode, _ in modes}
    return {"model": model.path, "accuracy": accuracy}


def _regroup(items: list, sizes: list[int]) -> list[list]:
    """`items` cut into consecutive groups of `sizes` (the graded samples of each problem)."""
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [items[start : start + size] for start, size in zip(starts, sizes, strict=True)]


def _data_description(task: str, cfg: EvalConfig) -> str:
    benchmark = BENCHMARKS.get(task)
    if benchmark is None:
        return f"testbed {cfg.split} split"
    return cfg.data_files().get(task) or f"{benchmark.source} ({benchmark.split})"


def run_eval(cfg: EvalConfig, run: RunDir, overwrite: bool) -> None:
    models = [resolve_model(reference, run) for reference in cfg.models]
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise UserError(
            f"eval: two models share the name {next(n for n in names if names.count(n) > 1)!r}; their results would collide"
        )
    problems: dict[str, list[Problem]] = defaultdict(list)
    inputs = {}
    if cfg.uses_run_problems():
        for problem in load_problems(run, cfg, cfg.split, step="eval"):
            problems[problem.task].append(problem)
        inputs["problems"] = run.finished_step("problems")["fingerprint"]
    benchmarks = load_benchmarks(cfg, cfg.limit)
    problems.update(benchmarks)
    inputs.update(benchmark_inputs(benchmarks))
    inputs["graders"] = {task: cfg.grader_for(task).id for task in problems}
    for reference, model in zip(cfg.models, models, strict=True):
        # One step per model, configured with that model only, so adding a model to the list
        # later does not invalidate the results of the others.
        step_config = cfg.model_copy(update={"models": [reference]})
        result = run.step(
            f"eval:{model.name}",
            step_config,
            {**inputs, "model": model.fingerprint},
            lambda _fp, m=model: evaluate_model(m, problems, cfg, run),
            outputs=[run.eval_dir(model.name) / f"{task}.json" for task in problems],
            overwrite=overwrite,
        )
        note(f"eval:{model.name}: accuracy {result['stats']['accuracy']}")


STAGE = Stage(
    "eval",
    EvalConfig,
    run_eval,
    "evaluate models on held-out testbed problems and public benchmarks with the shared graders",
    produces=lambda cfg: [f"eval:{reference_name(m)}" for m in cfg.models],
    requires=lambda cfg: {
        **({"problems": "problems"} if cfg.uses_run_problems() else {}),
        **required_steps("models", cfg.models),
    },
    default_run_dir="runs/eval",
)
