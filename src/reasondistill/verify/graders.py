"""Graders: `grade(completion, problem) -> Verdict`, the same objects in `verify` and in `eval`.

Every grader has a stable id, `name@version+<hash of its configuration>`, written into each artifact
it grades, so a filtered dataset and an evaluation can be checked to agree on how they were graded.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from fractions import Fraction
from importlib import metadata

from ..records import Label, Problem
from .reasoning import split_reasoning
from .timebound import TimeBoundCall

log = logging.getLogger(__name__)


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

    @functools.cached_property  # read for every graded row; a grader's configuration never changes
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
        return self.judge(split.final, problem.answer)

    @abstractmethod
    def judge(self, final: str, gold: str) -> Verdict:
        """Grade a finished final-answer text against the gold answer."""


class ExtractingGrader(Grader):
    """A grader that pulls one answer string out of the final text and compares it with the gold."""

    def judge(self, final: str, gold: str) -> Verdict:
        extracted = self.extract(final)
        if extracted is None:
            return Verdict("unparseable", None)
        return Verdict("correct" if self.matches(extracted, gold) else "incorrect", extracted)

    @abstractmethod
    def extract(self, final: str) -> str | None:
        """The answer stated in the final text, or None when there is none in the expected form."""

    @abstractmethod
    def matches(self, extracted: str, gold: str) -> bool: ...


class AnswerIsGrader(ExtractingGrader):
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


class NumericGrader(ExtractingGrader):
    """Numeric final answers as GSM8K-style data writes them.

    The answer is the last `\\boxed{X}`; failing that the last `#### X`; failing that the last
    "the answer is X" / "final answer: X"; and, only with `last_number_fallback`, the last number
    anywhere in the final text. `$`, `%`, thousands separators and a sentence's closing punctuation
    are ignored; numbers compare exactly as fractions ("18" == "18.00", "1,234.50" == "1234.5",
    "3/4" == "0.75").
    """

    name = "numeric"
    version = "1"
    _NUMBER = r"[-+]?(?:\\?\$)?[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?(?:/\d+)?%?"
    _STYLES = (
        re.compile(r"\\boxed\{\s*(" + _NUMBER + r")\s*\}"),
        re.compile(r"####\s*(" + _NUMBER + r")"),
        re.compile(r"(?:the answer is|final answer\s*(?:is)?)\s*:?\s*(" + _NUMBER + r")", re.IGNORECASE),
    )

    def __init__(self, last_number_fallback: bool = False):
        self.last_number_fallback = last_number_fallback
        self._styles = self._STYLES + ((re.compile(f"({self._NUMBER})"),) if last_number_fallback else ())

    def config(self) -> dict:
        return {"last_number_fallback": self.last_number_fallback}

    def extract(self, final: str) -> str | None:
        for style in self._styles:
            found = [m for m in style.findall(final) if _to_fraction(m) is not None]
            if found:
                return found[-1]
        return None

    def matches(self, extracted: str, gold: str) -> bool:
        gold_value = _to_fraction(gold)
        if gold_value is None:
            raise ValueError(f"numeric grader: the gold answer {gold!r} is not a number")
        return _to_fraction(extracted) == gold_value


def _to_fraction(text: str) -> Fraction | None:
    """The exact value of a number as written ("$1,234.50" → 2469/2), or None if it is not one."""
    cleaned = text.strip().rstrip(".").replace("\\$", "").replace("$", "").replace(",", "").removesuffix("%")
    try:
        return Fraction(cleaned)
    except (ValueError, ZeroDivisionError):
        return None


class OptionGrader(ExtractingGrader):
    """One of a fixed set of options: multiple-choice letters or labels such as True/False/Unknown.

    The answer is the last `\\boxed{X}` (or `\\boxed{\\text{X}}`); failing that the last
    "answer is X" / "answer: X"; failing that a final text that is nothing but the option. `(B)`,
    `**True**` and a closing full stop are accepted around it. Letters are case-sensitive, so the
    article "a" is never read as option A; words are not ("true" is True).
    """

    version = "1"

    def __init__(self, options: tuple[str, ...], name: str):
        self.options, self.name = options, name
        self.case_sensitive = all(len(option) == 1 for option in options)
        alternatives = "|".join(re.escape(option) for option in sorted(options, key=len, reverse=True))
        alternatives = alternatives if self.case_sensitive else f"(?i:{alternatives})"
        option = f"(?:\\*\\*|\\()?\\s*({alternatives})\\s*(?:\\*\\*|\\))?"
        self._stated = (
            re.compile(r"\\boxed\{\s*(?:\\text\{)?\s*" + option + r"\s*\}?\s*\}"),
            re.compile(r"(?i:answer\s*(?:is|:)?\s*(?:option\s*)?:?)\s*" + option + r"(?![A-Za-z])"),
        )
        self._alone = re.compile(r"\s*" + option + r"\s*[.)]?\s*")

    def config(self) -> dict:
        return {"options": list(self.options)}

    def extract(self, final: str) -> str | None:
        for pattern in self._stated:
            found = pattern.findall(final)
            if found:
                return self._canonical(found[-1])
        alone = self._alone.fullmatch(final)
        return self._canonical(alone.group(1)) if alone else None

    def _canonical(self, text: str) -> str:
        return next(
            o for o in self.options if o == text or (not self.case_sensitive and o.lower() == text.lower())
        )

    def matches(self, extracted: str, gold: str) -> bool:
        gold = gold.strip().strip("()")
        return extracted == gold if self.case_sensitive else extracted.lower() == gold.lower()


class ChoiceGrader(OptionGrader):
    """Multiple choice among `letters`: "B", "(B)", "\\boxed{B}", "the answer is B"."""

    def __init__(self, letters: str = "ABCDE"):
        super().__init__(tuple(letters), name="choice")


class LabelGrader(OptionGrader):
    """A label such as True/False/Unknown: "True", "**False**", "the answer is unknown"."""

    def __init__(self, labels: tuple[str, ...] = ("True", "False", "Unknown")):
        super().__init__(labels, name="label")


class ExactStringGrader(ExtractingGrader):
    """A short free-text answer compared as a string: a relation ("grandson"), a name, a word.

    The answer is the last `\\boxed{X}` (or `\\boxed{\\text{X}}`); failing that what follows the
    last "answer is" / "answer:" up to the end of its sentence; failing that a one-line final text.
    Both sides are compared after collapsing whitespace and stripping surrounding quotes, `**`,
    brackets and a closing full stop; case is ignored unless `case_sensitive`.
    """

    name = "exact"
    version = "1"
    _BOXED = re.compile(r"\\boxed\{\s*(?:\\text\{)?([^{}]*)\}?\s*\}")
    _STATED = re.compile(r"answer\s*(?:is|:)\s*:?\s*([^\n]+?)\s*(?:\.(?:\s|$)|\n|$)", re.IGNORECASE)

    def __init__(self, case_sensitive: bool = False):
        self.case_sensitive = case_sensitive

    def config(self) -> dict:
        return {"case_sensitive": self.case_sensitive}

    def extract(self, final: str) -> str | None:
        for pattern in (self._BOXED, self._STATED):
            found = pattern.findall(final)
            if found:
                return self._normalise(found[-1]) or None
        if "\n" in final.strip():
            return None
        return self._normalise(final) or None

    def _normalise(self, text: str) -> str:
        text = " ".join(text.split()).strip(" .*\"'`()[]")
        return text if self.case_sensitive else text.casefold()

    def matches(self, extracted: str, gold: str) -> bool:
        return extracted == self._normalise(gold)


class MathGrader(Grader):
    """math-verify, with explicit extraction configs and a time limit that holds in any thread.

    Gold: `gold_format="latex"` reads the gold answer as LaTeX (MATH, AIME: `\\frac{14}{3}`),
    `"number"` as a plain expression (GSM8K: `18`). Prediction: LaTeX with the last `\\boxed{}`
    first, then plain expressions. Then `verify(gold, prediction)`, in that order: math-verify's
    comparison is asymmetric by design (a gold number accepts a predicted chain `a = b = 101`, not
    the reverse). Parsing and comparison run in a helper process (see `timebound`); an answer that
    takes longer than `timeout_s` is `unparseable` and logged.
    """

    name = "math-verify"
    version = "1"

    def __init__(self, gold_format: str = "latex", timeout_s: float = 5.0, float_rounding: int = 6):
        if gold_format not in ("latex", "number"):
            raise ValueError(f"gold_format must be 'latex' or 'number', got {gold_format!r}")
        self.gold_format, self.timeout_s, self.float_rounding = gold_format, timeout_s, float_rounding
        self._call = TimeBoundCall(_math_verdict, timeout_s, prepare=_import_math_verify)

    def config(self) -> dict:
        return {
            "gold_format": self.gold_format,
            "prediction": "latex(boxed first; latex, units, malformed operators, nits normalised) + expr",
            "float_rounding": self.float_rounding,
            "timeout_s": self.timeout_s,
            "math_verify": metadata.version("math-verify"),
        }

    def judge(self, final: str, gold: str) -> Verdict:
        try:
            label, extracted = self._call(final, gold, self.gold_format, self.float_rounding)
        except TimeoutError:
            log.warning("%s: grading took longer than %ss; counted as unparseable", self.id, self.timeout_s)
            return Verdict("unparseable", None)
        return Verdict(label, extracted)


def _import_math_verify() -> None:
    import math_verify  # noqa: F401  (SymPy and the LaTeX parser: seconds, paid once per helper)


def _math_verdict(final: str, gold: str, gold_format: str, float_rounding: int) -> tuple[str, str | None]:
    """Runs in the helper process. Timeouts are off (`None`): they would need the main thread."""
    from latex2sympy2_extended import NormalizationConfig
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    if gold_format == "latex":
        gold_parsed = parse(f"${gold}$", [LatexExtractionConfig()], parsing_timeout=None)
    else:
        gold_parsed = parse(gold, [ExprExtractionConfig()], parsing_timeout=None)
    if not gold_parsed:
        raise ValueError(f"the gold answer {gold!r} does not parse as {gold_format}")
    prediction_config = [
        LatexExtractionConfig(
            boxed_match_priority=0,
            normalization_config=NormalizationConfig(
                basic_latex=True,
                units=True,
                malformed_operators=True,
                nits=True,
                boxed="all",
                equations=False,
            ),
        ),
        ExprExtractionConfig(),
    ]
    prediction = parse(final, prediction_config, parsing_timeout=None)
    if not prediction:
        return "unparseable", None
    correct = verify(gold_parsed, prediction, float_rounding=float_rounding, timeout_seconds=None)
    return ("correct" if correct else "incorrect"), str(prediction[-1])


GRADER_SPECS = {
    "numeric": "GSM8K-style numbers (boxed, ####, 'the answer is'); numeric:last-number also reads the last number",
    "math-verify:latex": "math-verify, gold answer in LaTeX (MATH)",
    "math-verify:number": "math-verify, gold answer a plain number (AIME, AMC, GSM8K)",
    "choice:ABCD": "multiple-choice letters, any set of letters",
    "label:True/False/Unknown": "one of a set of labels, any labels separated by /",
    "exact": "a short string, case-insensitive; exact:case-sensitive keeps case",
}


def grader_from_spec(spec: str) -> Grader:
    """A grader named as in recipes and on the command line: `numeric`, `math-verify:number`,
    `choice:ABCD`, `label:True/False/Uncertain`, `exact` … (see GRADER_SPECS)."""
    kind, _, argument = spec.partition(":")
    if kind == "numeric" and argument in ("", "last-number"):
        return NumericGrader(last_number_fallback=argument == "last-number")
    if kind == "math-verify" and argument in ("latex", "number"):
        return MathGrader(gold_format=argument)
    if kind == "choice" and re.fullmatch(r"[A-Z]{2,}", argument):
        return ChoiceGrader(argument)
    if kind == "label" and len(labels := tuple(filter(None, argument.split("/")))) >= 2:
        return LabelGrader(labels)
    if kind == "exact" and argument in ("", "case-sensitive"):
        return ExactStringGrader(case_sensitive=argument == "case-sensitive")
    raise ValueError(f"unknown grader {spec!r}; graders are: {', '.join(GRADER_SPECS)}")
