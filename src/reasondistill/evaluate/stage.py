"""`eval`: accuracy of models on held-out problems, graded by the same graders as `verify`.

For each model and task: greedy accuracy, and over n samples at a temperature the mean accuracy
(pass@1), unbiased pass@k and mean completion tokens. Results go to eval/<model>/<task>.json, the
graded completions to eval/<model>/<task>.<greedy|sampled>.parquet.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import asdict
from typing import Literal

from pydantic import Field

from ..errors import UserError
from ..generate.base import SamplingParams
from ..generate.hf import HFGenerator
from ..generate.stage import SamplingOptions, make_traces
from ..modelref import ResolvedModel, reference_name, required_steps, resolve_model
from ..records import GradedTrace, Problem, atomic_write_json, write_records
from ..rundir import RunDir
from ..stages import Stage
from ..tasks import get_task
from ..tasks.stage import ProblemSelection, load_problems
from ..ui import note, progress_bar
from ..verify.stage import grade_trace
from .metrics import summarise


class EvalConfig(SamplingOptions, ProblemSelection):
    models: list[str] = Field(
        min_length=1, description="models to evaluate (testbed:…, trained names, folders, Hub ids)"
    )
    split: Literal["train", "test"] = Field("test", description="which problems to evaluate on")
    n: int = Field(4, ge=0, description="sampled completions per problem (0: greedy only)")
    greedy: bool = Field(True, description="also decode greedily (one completion at temperature 0)")


def _modes(cfg: EvalConfig) -> list[tuple[str, SamplingParams]]:
    modes = [("greedy", cfg.sampling(1, 0.0, cfg.seed))] if cfg.greedy else []
    if cfg.n:
        modes.append(("sampled", cfg.sampling(cfg.n, cfg.temperature, cfg.seed)))
    if not modes:
        raise UserError("eval: nothing to do; set greedy: true or n >= 1")
    return modes


def evaluate_model(model: ResolvedModel, problems: list[Problem], cfg: EvalConfig, run: RunDir) -> dict:
    generator = HFGenerator(model.path, batch_size=cfg.batch_size)
    parameters = sum(p.numel() for p in generator.model.parameters())
    by_task: dict[str, list[Problem]] = defaultdict(list)
    for problem in problems:
        by_task[problem.task].append(problem)
    modes = _modes(cfg)
    out = run.eval_dir(model.name)
    accuracy = {}
    total = sum(len(problems) * sampling.n for _, sampling in modes)
    with progress_bar(f"eval {model.name}", total=total, unit="completions") as bar:
        for task, task_problems in sorted(by_task.items()):
            result = {"model": model.name, "path": model.path, "parameters": parameters, "task": task,
                      "split": cfg.split, "grader": get_task(task).grader.id}  # fmt: skip
            for mode, sampling in modes:
                source = json.dumps({"model": model.name, "backend": "hf", "sampling": asdict(sampling)})
                completions = generator.generate(
                    [p.messages for p in task_problems], sampling, progress=bar.advance
                )
                graded = [
                    grade_trace(trace, problem)
                    for problem, samples in zip(task_problems, completions, strict=True)
                    for trace in make_traces(problem, samples, source)
                ]
                write_records(out / f"{task}.{mode}.parquet", graded, GradedTrace)
                correct = [
                    [g.label == "correct" for g in graded[i : i + sampling.n]]
                    for i in range(0, len(graded), sampling.n)
                ]
                result[mode] = {
                    "temperature": sampling.temperature,
                    **summarise(correct, [g.completion_tokens for g in graded]),
                    "labels": dict(Counter(g.label for g in graded)),
                }
            atomic_write_json(out / f"{task}.json", result)
            accuracy[task] = {mode: round(result[mode]["accuracy"], 4) for mode, _ in modes}
    return {"model": model.path, "accuracy": accuracy}


def run_eval(cfg: EvalConfig, run: RunDir, overwrite: bool) -> None:
    models = [resolve_model(reference, run) for reference in cfg.models]
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise UserError(
            f"eval: two models share the name {next(n for n in names if names.count(n) > 1)!r}; their results would collide"
        )
    problems = load_problems(run, cfg, cfg.split)
    problems_fingerprint = run.finished_step("problems")["fingerprint"]
    tasks = sorted({p.task for p in problems})
    for reference, model in zip(cfg.models, models, strict=True):
        # One step per model, configured with that model only, so adding a model to the list
        # later does not invalidate the results of the others.
        step_config = cfg.model_copy(update={"models": [reference]})
        inputs = {"model": model.fingerprint, "problems": problems_fingerprint}
        result = run.step(
            f"eval:{model.name}",
            step_config,
            inputs,
            lambda _fp, m=model: evaluate_model(m, problems, cfg, run),
            outputs=[run.eval_dir(model.name) / f"{task}.json" for task in tasks],
            overwrite=overwrite,
        )
        note(f"eval:{model.name}: accuracy {result['stats']['accuracy']}")


STAGE = Stage(
    "eval",
    EvalConfig,
    run_eval,
    "evaluate models on held-out problems with the shared graders",
    produces=lambda cfg: [f"eval:{reference_name(m)}" for m in cfg.models],
    requires=lambda cfg: {"problems": "problems", **required_steps("models", cfg.models)},
)
