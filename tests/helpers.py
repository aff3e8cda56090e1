"""Builders and paths shared by several test modules."""

from pathlib import Path

from reasondistill.records import Message, Problem

# The real benchmark files the project's developers share (see its SOURCES.md), beside the checkout.
SHARED_BENCHMARKS = Path(__file__).resolve().parents[2] / "shared" / "data" / "benchmarks"


def problem(answer: str) -> Problem:
    """A one-question problem with this gold answer, for grading tests."""
    return Problem(id="p", task="t", messages=[Message(role="user", content="q")], answer=answer)
