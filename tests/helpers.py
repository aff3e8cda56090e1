"""Builders and paths shared by several test modules."""

from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from reasondistill.generate.base import SamplingParams
from reasondistill.generate.hf import HFGenerator
from reasondistill.records import Message, Problem
from reasondistill.tasks import TASKS

# The real benchmark files the project's developers share (see its SOURCES.md), beside the checkout.
SHARED_BENCHMARKS = Path(__file__).resolve().parents[2] / "shared" / "data" / "benchmarks"


def problem(answer: str) -> Problem:
    """A one-question problem with this gold answer, for grading tests."""
    return Problem(id="p", task="t", messages=[Message(role="user", content="q")], answer=answer)


class NoisyModel:
    """A model with Gaussian noise on every weight, σ = level × the tensor's standard deviation; the
    noise is drawn once (seed 0), so levels scale one direction and are comparable."""

    def __init__(self, model_dir: Path):
        self.model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        generator = torch.Generator().manual_seed(0)
        self.clean = {name: p.detach().clone() for name, p in self.model.named_parameters()}
        self.noise = {
            name: torch.randn(p.shape, generator=generator) * p.std() for name, p in self.clean.items()
        }

    def at(self, level: float) -> "NoisyModel":
        with torch.no_grad():
            for name, parameter in self.model.named_parameters():
                parameter.copy_(self.clean[name] + level * self.noise[name])
        return self

    def save(self, output: Path) -> Path:
        self.model.save_pretrained(output)
        self.tokenizer.save_pretrained(output)
        return output


def calibrated_noisy_copy(
    model_dir: Path, output: Path, problems: Sequence[Problem], window: tuple[float, float]
) -> tuple[Path, float, float]:
    """A noisy copy of `model_dir` whose greedy accuracy on `problems` lies inside `window`: a partly
    able student whose starting point is set by construction, whatever the testbed build.

    Accuracy falls as the noise grows, so the level is found by bisection (between a level the model
    is above the window and one it is below). Returns (folder, noise level, accuracy)."""
    noisy = NoisyModel(model_dir)
    low, high = 0.0, 1.0  # above and below the window: the clean teacher, and a wrecked model
    measured = []
    for _ in range(10):
        level = (low + high) / 2
        generator = HFGenerator.around(noisy.at(level).model, noisy.tokenizer, batch_size=128)
        accuracy = greedy_accuracy_of(generator, problems)
        measured.append(f"{level:.3f}: {accuracy:.3f}")
        if window[0] <= accuracy <= window[1]:
            return noisy.save(output), level, accuracy
        low, high = (level, high) if accuracy > window[1] else (low, level)
    raise AssertionError(f"no noise level puts {model_dir} inside {window} (level: accuracy {measured})")


def greedy_accuracy(model_dir: Path, problems: Sequence[Problem]) -> float:
    """Share of `problems` (one testbed task) the model answers right with greedy decoding."""
    return greedy_accuracy_of(HFGenerator(model_dir, batch_size=128), problems)


def greedy_accuracy_of(generator: HFGenerator, problems: Sequence[Problem]) -> float:
    outputs = generator.generate(
        [p.messages for p in problems], SamplingParams(temperature=0, max_new_tokens=120)
    )
    grader = TASKS[problems[0].task].grader
    right = sum(
        grader.grade(o[0].text, p, o[0].finish_reason).label == "correct"
        for o, p in zip(outputs, problems, strict=True)
    )
    return right / len(problems)


def eval_runs(root: Path, models: dict[str, list[str]], test: int, *options: str) -> dict[str, Path]:
    """For each name, a run directory under `root` with `test` arithmetic and logic test problems,
    evaluated (`reasondistill eval`) with that name's options and `options`: {name: run directory}."""
    from reasondistill.cli import main

    runs = {}
    for name, model_options in models.items():
        runs[name] = run_dir = root / name
        main(["problems", "--run-dir", str(run_dir), "--tasks", "arithmetic,logic", "--train", "1",
              "--test", str(test)])  # fmt: skip
        main(["eval", "--run-dir", str(run_dir), *model_options, *options])
    return runs
