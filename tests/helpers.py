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


def noisy_copy(model_dir: Path, output: Path, noise: float) -> Path:
    """`model_dir` with Gaussian noise (σ = noise × the tensor's std) on every weight: a partly able
    student for short training runs (the random testbed student needs hundreds of steps to answer)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * noise * parameter.std())
    model.save_pretrained(output)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(output)
    return output


def greedy_accuracy(model_dir: Path, problems: Sequence[Problem]) -> float:
    """Share of `problems` (one testbed task) the model answers right with greedy decoding."""
    outputs = HFGenerator(model_dir, batch_size=128).generate(
        [p.messages for p in problems], SamplingParams(temperature=0, max_new_tokens=120)
    )
    grader = TASKS[problems[0].task].grader
    right = sum(
        grader.grade(o[0].text, p, o[0].finish_reason).label == "correct"
        for o, p in zip(outputs, problems, strict=True)
    )
    return right / len(problems)
