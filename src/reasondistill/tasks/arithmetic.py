"""Multi-digit addition, solved column by column with explicit carries.

Difficulty = number of digits of each operand (1-6). The gold solution works right to left, one line
per column, names the column ("tens: 4 + 7 + 1 = 12, carry 1, so far 23."), and keeps the
digits written so far, so the final answer is a copy of the last line rather than a reversal.

Why this shape: a small transformer finds "the k-th digit from the right" reliably only when it is
told k (the place word) and the operands end at fixed anchors (" +" and "?"); without the place
word, a 0.7M-parameter model got 3-digit columns wrong most of the time within the same budget.
"""

from __future__ import annotations

import random

from ..verify.graders import AnswerIsGrader
from .base import GeneratedProblem, GeneratedTask

PLACES = ("ones", "tens", "hundreds", "thousands", "ten-thousands", "hundred-thousands", "millions")


class ArithmeticTask(GeneratedTask):
    name = "arithmetic"
    description = "multi-digit addition with step-by-step carries"
    difficulties = range(1, 7)
    difficulty_label = "digits per number"
    default_difficulties = (2, 3, 4)
    grader = AnswerIsGrader("integer")

    def make(self, rng: random.Random, difficulty: int) -> GeneratedProblem:
        low, high = 10 ** (difficulty - 1), 10**difficulty - 1
        a, b = rng.randint(low, high), rng.randint(low, high)
        lines, carry, written = [], 0, ""
        for place, da, db in zip(PLACES, reversed(str(a)), reversed(str(b)), strict=False):
            total = int(da) + int(db) + carry
            terms = f"{da} + {db} + {carry}" if carry else f"{da} + {db}"
            carry, digit = divmod(total, 10)
            written = f"{digit}{written}"
            lines.append(f"{place}: {terms} = {total}, carry {carry}, so far {written}.")
        if carry:
            written = f"{carry}{written}"
            lines.append(f"{PLACES[difficulty]}: carry {carry}, so far {written}.")
        return GeneratedProblem(
            question=f"What is {a} + {b}?",
            reasoning="\n".join(lines),
            answer=str(a + b),
            meta={"operands": [a, b]},
        )
