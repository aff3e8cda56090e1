"""Rule-chaining deduction with True / False / Unknown answers, in the style of ProofWriter.

Difficulty = proof depth (1-5): the number of rules chained from a fact to the queried statement.
The world is open: a statement is True when it follows from the facts and rules, False when its
negation follows, and Unknown when neither does. Answers are balanced over the three labels.

Rules are written conclusion first ("Someone is young if they are small and rough.") and the gold
solution chains backwards from the question: the rule for the goal, then each of its conditions
(a fact, another rule, or not known), then the verdict. Each step finds the goal in the rules and
copies what follows it, which a small model learns far more easily than picking the next rule to
apply forwards (a 0.7M-parameter model trained on forward chains answered "False" to everything).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ..verify.graders import AnswerIsGrader
from .base import GeneratedProblem, GeneratedTask

NAMES = ("Anne", "Bob", "Charlie", "Dave", "Erin", "Fiona", "Gary", "Harry")
ATTRIBUTES = (
    "big", "blue", "cold", "furry", "green", "kind", "nice", "quiet", "red",
    "rough", "round", "smart", "white", "young", "happy", "tall", "small", "strong",
)  # fmt: skip
LABELS = ("True", "False", "Unknown")
CONJUNCTION_PROBABILITY = 0.3


@dataclass(frozen=True)
class Rule:
    premises: tuple[str, ...]
    conclusion: str
    negated: bool = False  # "Someone is not <conclusion> if ..."

    def sentence(self, subject: str = "Someone", pronoun: str = "they are") -> str:
        conclusion = f"not {self.conclusion}" if self.negated else self.conclusion
        return f"{subject} is {conclusion} if {pronoun} {' and '.join(self.premises)}."


def backward_chain(name: str, query: str, facts: set[str], rules: list[Rule]) -> tuple[str, list[str]]:
    """Prove or refute `name is query`: (label, one line per step of the proof)."""
    lines: list[str] = []

    def holds(attribute: str) -> bool:
        if attribute in facts:
            lines.append(f"{name} is {attribute}: a fact.")
            return True
        rule = next((r for r in rules if r.conclusion == attribute and not r.negated), None)
        if rule is None:
            lines.append(f"{name} is {attribute}: not known.")
            return False
        lines.append(rule.sentence(name, f"{name} is"))
        return all(holds(p) for p in rule.premises)  # stops at the first condition that fails

    rule = next((r for r in rules if r.conclusion == query), None)
    if rule is not None:
        lines.append(rule.sentence(name, f"{name} is"))
        if all(holds(p) for p in rule.premises):
            lines.append(f"So {name} is {'not ' if rule.negated else ''}{query}.")
            return ("False" if rule.negated else "True"), lines
    else:
        lines.append(f"No rule says when someone is {query}.")
    lines.append(f"Nothing shows whether {name} is {query}.")
    return "Unknown", lines


class LogicTask(GeneratedTask):
    name = "logic"
    description = "rule-chaining deduction, answers True/False/Unknown (ProofWriter-like)"
    difficulties = range(1, 6)
    difficulty_label = "proof depth"
    default_difficulties = (1, 2, 3)
    grader = AnswerIsGrader("label", LABELS)

    def make(self, rng: random.Random, difficulty: int) -> GeneratedProblem:
        label = rng.choice(LABELS)
        name = rng.choice(NAMES)
        attributes = list(ATTRIBUTES)
        rng.shuffle(attributes)
        chain, pool = attributes[: difficulty + 1], attributes[difficulty + 1 :]
        query = chain[-1]

        # The proof chain chain[0] -> ... -> chain[-1]; some steps also need a second, known premise.
        facts, rules = [], []
        for i in range(1, difficulty + 1):
            premises = (chain[i - 1],)
            if rng.random() < CONJUNCTION_PROBABILITY:
                extra = pool.pop()
                facts.append(extra)
                premises += (extra,)
            rules.append(Rule(premises, chain[i], negated=(label == "False" and i == difficulty)))
        # Unknown: the chain never starts (its first premise is not a fact), so nothing decides the query.
        if label != "Unknown":
            facts.append(chain[0])

        # Distractors use attributes outside the chain, so they cannot decide the query.
        facts.extend(pool.pop() for _ in range(rng.randint(0 if facts else 1, 2)))
        for _ in range(rng.randint(1, 3)):
            conclusion = pool.pop()
            premise = rng.choice([a for a in facts + pool[:3] if a != conclusion])
            rules.append(Rule((premise,), conclusion, negated=rng.random() < 0.2))
        negative_fact = pool.pop() if rng.random() < 0.3 else None

        rng.shuffle(facts)
        rng.shuffle(rules)
        derived_label, lines = backward_chain(name, query, set(facts), rules)
        assert derived_label == label, (label, derived_label)

        fact_sentences = [f"{name} is {fact}." for fact in facts]
        if negative_fact:
            fact_sentences.insert(rng.randint(0, len(fact_sentences)), f"{name} is not {negative_fact}.")
        question = (
            f"Facts: {' '.join(fact_sentences)}\n"
            f"Rules: {' '.join(rule.sentence() for rule in rules)}\n"
            f"Is it true that {name} is {query}? Answer True, False or Unknown."
        )
        return GeneratedProblem(
            question=question, reasoning="\n".join(lines), answer=label, meta={"depth": difficulty}
        )
