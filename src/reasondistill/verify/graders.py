"""Graders: `grade(completion, problem) -> Verdict`, the same objects in `verify` and in `eval`.

Every grader has a stable id, `name@version+<hash of its configuration>`, written into each artifact
it grades, so a filtered dataset and an evaluation can be checked to agree on how they were graded.
"""

from __future__ import annotations

import hashlib
import json
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass

from ..records import Label, Problem
from .reasoning import split_reasoning


@dataclass(frozen=True)
class Verdict:
    label: Label
    extracted: str | None  # the answer as extracted from the completion, before comparison


class Grader(ABC):
    name: str
    version: str

    def config(self) -> dict:
        """Everything that changes how this grader grades; hashed into its id."""
        return {}

    @property
    def id(self) -> str:
        digest = hashlib.sha256(json.dumps(self.config(), sort_keys=True).encode()).hexdigest()[:8]
        return f"{self.name}@{self.version}+{digest}"

    def grade(self, completion: str, problem: Problem, finish_reason: str | None = None) -> Verdict:
        """Grade the final-answer part of a completion against the problem's gold answer.

        A truncated completion (token limit reached, or a reasoning block never closed) is
        `unparseable`, never `correct`: its answer was not finished.
        """
        split = split_reasoning(completion)
        if finish_reason == "length" or not split.closed:
            return Verdict("unparseable", None)
        extracted = self.extract(split.final)
        if extracted is None:
            return Verdict("unparseable", None)
        return Verdict("correct" if self.matches(extracted, problem.answer) else "incorrect", extracted)

    @abstractmethod
    def extract(self, final: str) -> str | None:
        """The answer stated in the final text, or None when there is none in the expected form."""

    @abstractmethod
    def matches(self, extracted: str, gold: str) -> bool: ...


class AnswerIsGrader(Grader):
    """Grades testbed answers written as "The answer is X." (the last such statement counts).

    `kind="integer"` compares integers (thousands separators allowed); `kind="label"` compares a
    case-insensitive label from `labels`; anything else in the answer slot is unparseable.
    """

    version = "1"
    # The answer slot is one word, without the sentence's closing punctuation ("1,234." → "1,234").
    _PATTERN = re.compile(r"the answer is\s*:?\s*(\S+?)[.!]?(?=\s|$)", re.IGNORECASE)
    _INTEGER = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+|[-+]?\d+")

    def __init__(self, kind: str, labels: tuple[str, ...] = ()):
        if kind not in ("integer", "label"):
            raise ValueError(f"kind must be 'integer' or 'label', got {kind!r}")
        if kind == "label" and not labels:
            raise ValueError("a label grader needs its labels")
        self.kind, self.labels = kind, labels
        self.name = f"answer-is-{kind}"

    def config(self) -> dict:
        return {"kind": self.kind, "labels": list(self.labels)}

    def extract(self, final: str) -> str | None:
        statements = self._PATTERN.findall(final)
        if not statements:
            return None
        answer = statements[-1]
        if self.kind == "integer":
            return answer.replace(",", "") if self._INTEGER.fullmatch(answer) else None
        by_lower = {label.lower(): label for label in self.labels}
        return by_lower.get(answer.lower())

    def matches(self, extracted: str, gold: str) -> bool:
        if self.kind == "integer":
            return int(extracted) == int(gold.replace(",", ""))
        return extracted.lower() == gold.lower()
