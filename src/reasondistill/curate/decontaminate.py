"""Overlap of training examples with evaluation benchmarks: the n-grams they share.

Texts are case-folded and split into words (`\\w+`). A training example overlaps a benchmark
problem when one of its n-grams (default 8, the size used by open-r1's decontamination) occurs
in the problem's own text (without the instruction our prompts add); a problem shorter than n
words must occur whole. N-grams found in many problems of one benchmark are template text, not
evidence of contamination (ProofWriter's fixed question wording, say), so they are not indexed.

The `decontaminate` stage and the `decontaminate` curation operator find overlaps with this.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import Field

from ..records import Problem, TrainingExample
from ..tasks import get_benchmark
from ..tasks.selection import BenchmarkSelection

_WORD = re.compile(r"\w+")
MIN_TEMPLATE_PROBLEMS = 3  # an n-gram in this many problems or fewer is never called template text


def words(text: str) -> list[str]:
    return _WORD.findall(text.casefold())


def ngrams(tokens: Sequence[str], n: int) -> Iterator[tuple[str, ...]]:
    return (tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def prompt_text(messages) -> str:
    return "\n".join(m.content for m in messages if m.role != "assistant")


@dataclass(frozen=True)
class Overlap:
    row: int  # row of the training data
    problem_id: str  # the training example's problem id
    benchmark_problem: str  # id of the benchmark problem it overlaps
    ngram: str  # the first shared n-gram, as words


class BenchmarkIndex:
    """The n-grams of benchmark problems, each with the problems that contain it."""

    def __init__(self, benchmarks: dict[str, list[Problem]], n: int, template_share: float):
        self.problems: dict[tuple[str, ...], list[str]] = defaultdict(list)
        for name, problems in benchmarks.items():
            benchmark = get_benchmark(name)
            holders: dict[tuple[str, ...], set[str]] = defaultdict(set)
            for problem in problems:
                tokens = words(benchmark.question(problem))
                for gram in ngrams(tokens, n) if len(tokens) >= n else [tuple(tokens)]:
                    holders[gram].add(problem.id)
            template = max(MIN_TEMPLATE_PROBLEMS, template_share * len(problems))
            for gram, ids in holders.items():
                if gram and len(ids) <= template:
                    self.problems[gram].extend(sorted(ids))
        # Problems shorter than n words are indexed whole, so texts are also cut into those lengths.
        self.lengths = sorted({len(gram) for gram in self.problems})

    def overlaps(self, text: str) -> dict[str, tuple[str, ...]]:
        """Benchmark problems sharing an n-gram with `text`, each with the first shared n-gram."""
        tokens = words(text)
        found: dict[str, tuple[str, ...]] = {}
        for length in self.lengths:
            for gram in ngrams(tokens, length):
                for problem_id in self.problems.get(gram, ()):
                    found.setdefault(problem_id, gram)
        return found


def find_overlaps(
    examples: Sequence[TrainingExample], index: BenchmarkIndex, check: Sequence[str], progress=None
) -> list[Overlap]:
    overlaps = []
    for row, example in enumerate(examples):
        text = "\n".join(
            prompt_text(example.messages) if part == "prompt" else example.completion for part in check
        )
        for problem_id, gram in index.overlaps(text).items():
            overlaps.append(Overlap(row, example.problem_id, problem_id, " ".join(gram)))
        if progress:
            progress(1)
    return overlaps


class ContaminationCheck(BenchmarkSelection):
    """What counts as an overlap with the evaluation benchmarks (the `decontaminate` stage and operator)."""

    benchmarks: list[str] = Field(min_length=1, description="evaluation benchmarks to compare with")
    ngram: int = Field(8, ge=1, description="n-gram length in words")
    check: list[Literal["prompt", "completion"]] = Field(
        ["prompt"], min_length=1, description="which parts of each training example to compare"
    )
    template_share: float = Field(
        0.1,
        gt=0,
        le=1,
        description="an n-gram in more than this share of a benchmark's problems (and in more than "
        f"{MIN_TEMPLATE_PROBLEMS}) is template text and ignored",
    )
