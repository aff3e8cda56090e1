"""`eval`: models on held-out testbed problems and public benchmarks, graded like `verify` grades.

Each model is evaluated by evaluate/harness.py (greedy accuracy; pass@1, pass@k, maj@k over n
samples; lengths; accuracy by difficulty). Results go to eval/<model>/<task>.json, the graded
completions to eval/<model>/<task>.<greedy|sampled>.parquet.

    reasondistill eval --model PATH --benchmarks gsm8k,math500 --n 8 --temperature 0.6 --limit 50
    reasondistill eval --model NAME --backend openai --base-url http://localhost:8000/v1 --benchmarks aime24

Any backend runs the model (hf, vllm, or openai for a served model, `generate`'s options).
"""

from __future__ import annotations

from collections import defaultdict

from pydantic import AliasChoices, Field

from ..errors import UserError
from ..evaluate.harness import EvalOptions, evaluate_model
from ..modelref import backend_model, backend_requirements, reference_name
from ..records import Problem
from ..rundir import RunDir
from ..store import load_problems, problem_sets
from ..tasks.selection import ProblemSelection, benchmark_inputs, load_benchmarks
from ..ui import note
from .base import Stage


class EvalConfig(EvalOptions, ProblemSelection):
    models: list[str] = Field(
        min_length=1,
        validation_alias=AliasChoices("models", "model"),
        description="models to evaluate (testbed:…, trained names, folders, Hub ids; "
        "backend openai: the names the server knows them by)",
    )

    def uses_run_problems(self) -> bool:
        """Testbed problems of the run are evaluated unless only benchmarks were asked for."""
        return not self.benchmarks or self.tasks is not None


def run_eval(cfg: EvalConfig, run: RunDir, overwrite: bool) -> None:
    cfg.bind_sets(problem_sets(run))  # the graders of the run's problem sets
    models = [backend_model(cfg, reference, run) for reference in cfg.models]
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
            lambda _fp, m=model: evaluate_model(m, problems, cfg, run.eval_dir(m.name)),
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
        **backend_requirements(cfg, cfg.models, "models"),
    },
    default_run_dir="runs/eval",
)
