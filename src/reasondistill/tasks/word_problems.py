"""Multi-step arithmetic word problems from templates, in the style of GSM8K.

Difficulty = number of equations in the gold solution (2-6). A person starts with some items; each
sentence changes the count (buys, loses, gives away, buys packs of several, doubles, halves), some
sentences are irrelevant distractors, and the question asks for the final count. Every intermediate
count stays within 0-99 so each equation is a one- or two-digit operation.

The gold solution quotes each sentence before its equation ("Ben loses 3 apples. 17 - 3 = 14."),
and marks distractors as not needed: reading the problem in order becomes copying, which small
models learn quickly, instead of a search for the next relevant number.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from ..verify.graders import AnswerIsGrader
from .base import GeneratedProblem, GeneratedTask

NAMES = ("Anna", "Ben", "Carla", "David", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jack", "Kira", "Liam")
ITEMS = ("apples", "marbles", "stickers", "coins", "books", "pencils", "cookies", "cards", "shells", "stamps")
MAX_COUNT = 99
DISTRACTOR_PROBABILITY = 0.3

# (rng, count, name, friend, item) -> (sentence, solution equations, new count)
Operation = Callable[[random.Random, int, str, str, str], tuple[str, list[str], int]]


def _add(rng, count, name, friend, item):
    k = rng.randint(2, min(9, MAX_COUNT - count))
    sentence = rng.choice(
        [f"{name} buys {k} more.", f"{friend} gives {name} {k} more.", f"{name} finds {k} more."]
    )
    return sentence, [f"{count} + {k} = {count + k}."], count + k


def _subtract(rng, count, name, friend, item):
    k = rng.randint(2, min(9, count))
    sentence = rng.choice([f"{name} gives {k} to {friend}.", f"{name} loses {k}.", f"{name} sells {k}."])
    return sentence, [f"{count} - {k} = {count - k}."], count - k


def _buy_packs(rng, count, name, friend, item):
    room = MAX_COUNT - count
    packs = rng.randint(2, min(5, room // 2))
    per_pack = rng.randint(2, min(9, room // packs))
    bought = packs * per_pack
    sentence = f"{name} buys {packs} packs of {per_pack}."
    return (
        sentence,
        [f"{packs} * {per_pack} = {bought}.", f"{count} + {bought} = {count + bought}."],
        count + bought,
    )


def _double(rng, count, name, friend, item):
    return f"{name} doubles the {item}.", [f"{count} * 2 = {2 * count}."], 2 * count


def _halve(rng, count, name, friend, item):
    sentence = f"{name} gives half to {friend}."
    return sentence, [f"{count} / 2 = {count // 2}."], count // 2


# (cost in equations, feasibility for the current count, operation)
OPERATIONS: tuple[tuple[int, Callable[[int], bool], Operation], ...] = (
    (1, lambda c: c <= MAX_COUNT - 2, _add),
    (1, lambda c: c >= 2, _subtract),
    (2, lambda c: MAX_COUNT - c >= 4, _buy_packs),
    (1, lambda c: c >= 1 and 2 * c <= MAX_COUNT, _double),
    (1, lambda c: c >= 2 and c % 2 == 0, _halve),
)


class WordProblemTask(GeneratedTask):
    name = "word_problems"
    description = "multi-step arithmetic word problems (GSM8K-like templates)"
    difficulties = range(2, 7)
    difficulty_label = "reasoning steps"
    default_difficulties = (2, 3, 4)
    grader = AnswerIsGrader("integer")

    def make(self, rng: random.Random, difficulty: int) -> GeneratedProblem:
        name, friend = rng.sample(NAMES, 2)
        item, other_item = rng.sample(ITEMS, 2)
        start = count = rng.randint(2, 20)
        sentences = [f"{name} has {start} {item}."]
        lines = [f"{sentences[0]} Start with {start}."]
        equations = 0
        while equations < difficulty:
            budget = difficulty - equations
            options = [op for cost, feasible, op in OPERATIONS if cost <= budget and feasible(count)]
            sentence, new_equations, new_count = rng.choice(options)(rng, count, name, friend, item)
            if sentence in sentences:  # a repeated sentence would make the quoting ambiguous
                continue
            count = new_count
            sentences.append(sentence)
            lines.append(f"{sentence} {' '.join(new_equations)}")
            equations += len(new_equations)
            distractor = f"{friend} has {rng.randint(2, 20)} {other_item}."
            if rng.random() < DISTRACTOR_PROBABILITY and distractor not in sentences:
                sentences.append(distractor)
                lines.append(f"{distractor} Not needed.")
        question = " ".join(sentences) + f" How many {item} does {name} have now?"
        return GeneratedProblem(question=question, reasoning="\n".join(lines), answer=str(count))
