"""A task loads (here: generates) problems, renders them as chat prompts and owns its grader."""

from __future__ import annotations

import hashlib
import json
import random
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..errors import UserError
from ..records import Message, Problem
from ..verify.graders import Grader
from ..verify.reasoning import format_completion

SPLITS = ("train", "test")
# One problem text in TEST_BUCKETS out of 10 belongs to the test split, whoever generates it (the
# teacher's training data, a recipe's train split or its test split): test problems are held out
# from every training set by construction.
TEST_BUCKETS = 10


def split_of(question: str) -> str:
    bucket = int(hashlib.sha256(question.encode()).hexdigest(), 16) % TEST_BUCKETS
    return "test" if bucket == 0 else "train"


def final_answer_text(answer: str) -> str:
    return f"The answer is {answer}."


@dataclass(frozen=True)
class GeneratedProblem:
    question: str
    reasoning: str  # the gold step-by-step solution, without the <think> tags
    answer: str
    meta: dict = field(default_factory=dict)


class GeneratedTask(ABC):
    """A procedurally generated task: seeded, reproducible, with a difficulty knob."""

    name: str
    description: str
    difficulties: range  # every valid difficulty level
    difficulty_label: str  # what the level counts, for reports
    default_difficulties: tuple[int, ...]
    grader: Grader

    @abstractmethod
    def make(self, rng: random.Random, difficulty: int) -> GeneratedProblem:
        """One problem of the given difficulty, drawn with `rng` only (so seeds reproduce it)."""

    def messages(self, question: str) -> list[Message]:
        return [Message(role="user", content=question)]

    def sample(
        self, split: str, n: int, seed: int, difficulties: Sequence[int] | None = None
    ) -> list[Problem]:
        """`n` distinct problems of `split`, difficulties drawn uniformly from `difficulties`."""
        if split not in SPLITS:
            raise UserError(f"task {self.name}: split must be one of {', '.join(SPLITS)}, got {split!r}")
        levels = tuple(difficulties or self.default_difficulties)
        invalid = [d for d in levels if d not in self.difficulties]
        if invalid:
            raise UserError(
                f"task {self.name}: difficulty {invalid[0]} is out of range "
                f"{self.difficulties.start}..{self.difficulties.stop - 1}"
            )
        rng = random.Random(f"{self.name}/{split}/{seed}")
        problems: dict[str, Problem] = {}
        attempts, max_attempts = 0, 200 * n + 1000
        while len(problems) < n:
            attempts += 1
            if attempts > max_attempts:
                raise UserError(
                    f"task {self.name}: found only {len(problems)} distinct {split} problems of "
                    f"difficulty {list(levels)}; ask for fewer or allow more difficulties"
                )
            difficulty = rng.choice(levels)
            generated = self.make(rng, difficulty)
            if split_of(generated.question) != split or generated.question in problems:
                continue
            problems[generated.question] = self._to_problem(generated, split, difficulty)
        return list(problems.values())

    def _to_problem(self, generated: GeneratedProblem, split: str, difficulty: int) -> Problem:
        digest = hashlib.sha256(generated.question.encode()).hexdigest()[:12]
        return Problem(
            id=f"{self.name}-{split}-{digest}",
            task=self.name,
            messages=self.messages(generated.question),
            answer=generated.answer,
            solution=format_completion(generated.reasoning, final_answer_text(generated.answer)),
            difficulty=difficulty,
            meta=json.dumps(generated.meta, sort_keys=True),
        )
