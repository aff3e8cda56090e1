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
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
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

    @property
    def spec(self) -> str | None:
        """The spec `grader_from_spec` builds this grader from (None: a grader no spec names)."""
        return None

    def flexible(self) -> Grader | None:
        """The lenient twin of a strict grader, which `eval` reports beside it (lm-eval-harness's
        flexible-extract beside strict-match), or None where the grader has no stricter form."""
        return None


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
    case-insensitive label from `labels`; anything else in the answer slot is unparseable, and so is
    an integer that an expression continues ("The answer is 3 + 4.", not 3).
    """

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
        # version 2 of the integer grader no longer reads an expression's first integer
        self.version = "2" if kind == "integer" else "1"

    def config(self) -> dict:
        return {"kind": self.kind, "labels": list(self.labels)}

    def extract(self, final: str) -> str | None:
        statements = list(self._PATTERN.finditer(final))
        if not statements:
            return None
        answer = statements[-1][1]
        if self.kind == "integer":
            whole = self._INTEGER.fullmatch(answer) and not _continues_expression(
                final, statements[-1].end(1)
            )
            return answer.replace(",", "") if whole else None
        by_lower = {label.lower(): label for label in self.labels}
        return by_lower.get(answer.lower())

    def matches(self, extracted: str, gold: str) -> bool:
        if self.kind == "integer":
            return int(extracted) == int(gold.replace(",", ""))
        return extracted.lower() == gold.lower()


class NumericGrader(ExtractingGrader):
    """Numeric final answers as GSM8K-style data writes them.

    The answer is the last `\\boxed{X}`; failing that the last `#### X`; failing that the last
    "the answer is X" / "final answer: X"; failing that a final text that is nothing but the answer
    (`**73**`, `$73$`); and, only with `last_number_fallback`, the last number in the final text.
    Around the number, `$`, `%`, units ("18 dollars", `18 \\text{ cm}`), bold `**`, math
    delimiters, a variable (`x = 3`) and a sentence's closing punctuation are ignored; numbers compare
    exactly as fractions ("18" == "18.00", "1,234.50" == "1234.5", "3/4" == "0.75", "1.5e3" ==
    "1500", and "1.000.000" == "1000000": two or more `.`-groups of three digits are thousands).

    The number must be the whole answer (see `_continues_expression`): a number that an expression
    continues (`2^{10}`, `3 \\times 10^6`, `2x`, `1.2.3`, `1 234`) is unparseable, never read as its
    first number. This grader evaluates no expressions; `math-verify` does. A `!` after the number
    is read as an exclamation mark, not a factorial.
    """

    name = "numeric"
    version = "2"
    _NUMBER = (
        r"[-+]?(?:\\?\$)?[-+]?"
        r"(?:\d{1,3}(?:\.\d{3}){2,}"  # 1.000.000
        r"|(?:\d{1,3}(?:(?:,|\{,\}|\\,)\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d{1,3}|/\d+)?)"
    )
    # The answer slot: bold, a math opening, `x =`, the number, `%`, then closings. Each run of
    # spaces follows a token that must be there: optional tokens between two of them would make a
    # failed match backtrack in cubic time over a long run of spaces.
    _SLOT = (
        r"(?:\*\*\s*)?(?:(?:\\\(|\$)\s*)?(?:[A-Za-z]\w*\s*=\s*)?"
        r"(?P<number>" + _NUMBER + r")(?:\s*\\?%)?(?:\s*(?:\\\)|\$|\*\*))*"
    )
    _UNIT = r"\s*\\(?:text|mbox|mathrm)\{[^{}]*\}|\s+[A-Za-z]{2,}(?:\s+[A-Za-z]+)*"
    _BOXED = re.compile(r"\\boxed\{\s*" + _SLOT + f"(?:{_UNIT})?" + r"\s*\}")
    _FOLLOWED = (  # an answer slot that the text after it must not continue into an expression
        re.compile(r"####\s*" + _SLOT),
        re.compile(r"(?i:the answer is|final answer(?:\s*is)?)[\s:*]*" + _SLOT),
    )
    _ALONE = re.compile(r"\s*" + _SLOT + r"\s*(?:\.\s*)?")
    _ANY = re.compile(r"(?P<number>" + _NUMBER + r")(?:\s*\\?%)?")

    def __init__(self, last_number_fallback: bool = False):
        self.last_number_fallback = last_number_fallback

    def config(self) -> dict:
        return {"last_number_fallback": self.last_number_fallback}

    @property
    def spec(self) -> str | None:
        return "numeric:last-number" if self.last_number_fallback else "numeric"

    def flexible(self) -> Grader | None:
        """The same extraction, falling back to the last number: a model that answers `A: 18` or
        `so she pays 18 dollars in total` is read, not scored unparseable."""
        return None if self.last_number_fallback else NumericGrader(last_number_fallback=True)

    def extract(self, final: str) -> str | None:
        boxed = [m["number"] for m in self._BOXED.finditer(final)]
        if boxed:
            return boxed[-1]
        for style in self._FOLLOWED:
            found = [m["number"] for m in style.finditer(final) if not _continues_expression(final, m.end())]
            if found:
                return found[-1]
        alone = self._ALONE.fullmatch(final)
        if alone:
            return alone["number"]
        return self._last_number(final) if self.last_number_fallback else None

    def _last_number(self, final: str) -> str | None:
        """The last number in the text, unless an expression ends with it (`2^{10}`: no answer)."""
        numbers = list(self._ANY.finditer(final))
        if numbers and _stands_alone(final, *numbers[-1].span()):
            return numbers[-1]["number"]
        return None

    def matches(self, extracted: str, gold: str) -> bool:
        gold_value = _to_fraction(gold)
        if gold_value is None:
            raise ValueError(f"numeric grader: the gold answer {gold!r} is not a number")
        return _to_fraction(extracted) == gold_value


_DOT_THOUSANDS = re.compile(r"(?<![\w.,])\d{1,3}(?:\.\d{3}){2,}(?!\w|[.,]\d)")


def _to_fraction(text: str) -> Fraction | None:
    """The exact value of a number as written ("$1,234.50" → 2469/2), or None if it is not one."""
    cleaned = text.strip().rstrip(".").replace("\\$", "").replace("$", "").removesuffix("%")
    cleaned = cleaned.replace("{,}", "").replace("\\,", "").replace(",", "")
    if _DOT_THOUSANDS.fullmatch(cleaned.lstrip("-+")):
        cleaned = cleaned.replace(".", "")
    try:
        return Fraction(cleaned)
    except (ValueError, ZeroDivisionError):
        return None


# After a number and its closings (`**`, `$`, `\)`), what makes it part of a larger expression
# rather than the whole answer. A space then a word ("18 dollars", "18 \text{cm}"), a word
# ("18cm"), `%`, closing brackets and a sentence's punctuation do not; `!` counts as punctuation.
_CLOSINGS = re.compile(r"(?:\s*(?:\*\*|\$|\\\)))*")
_CONTINUED = re.compile(
    r"""
      [.,:]\d | \d                      # more digits: 1.000.000 is not 1, nor 1,2345 or 3:45
    | [eE][-+]?\d                       # 1.5e3
    | [A-Za-z](?![A-Za-z])              # 2x, 3i
    | [({\[]                            # 2(3), 2{...}
    | [ \t\u00a0\u2009\u202f]+\d          # 1 234, 5 3/4
    | \s*(?:
          [\^_×·÷±]                     # powers, subscripts, products
        | [*/]\s*[-+\d.(\\{]            # 2 * 3, 18/2/3 (not "$18/hour")
        | [-+x]\s*[\d.(]                # 5 - 3, 3 x 10
        | \(\s*[-+\d.]                  # 2 (3 + 4)
        | \\(?!text|mbox|mathrm)[A-Za-z]  # \times, \cdot, \pi, \sqrt
        | \\[,;:!\ ]\s*\d               # 1\,000 is not 1
      )
    """,
    re.VERBOSE,
)
# Before a number (and its `$`, bold `**`, spaces): an operator that makes it part of an expression.
_OPERATOR_BEFORE = re.compile(r"(?:[\^_{×·÷±/+\-]|(?<![\s*])\*\*|(?<!\*)\*|\\[A-Za-z]+)$")
_SKIPPED_BEFORE = re.compile(r"(?:\s|(?<!\S)\*\*|\\?\$|[€£¥])+$")


def _continues_expression(text: str, end: int) -> bool:
    """Whether the text from `end` on continues the number that ends there into an expression."""
    return _CONTINUED.match(text, _CLOSINGS.match(text, end).end()) is not None


def _stands_alone(text: str, start: int, end: int) -> bool:
    """Whether `text[start:end]` (a number or expression) is not part of a larger expression."""
    before = text[max(0, start - 64) : start]
    if before and re.match(r"[\w.,)}\]]", before[-1]):
        return False  # 12 inside 312, 1.12 or x12
    before = _SKIPPED_BEFORE.sub("", before)
    return not _OPERATOR_BEFORE.search(before) and not _continues_expression(text, end)


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

    @property
    def spec(self) -> str | None:
        return f"{self.name}:{('' if self.name == 'choice' else '/').join(self.options)}"

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

    @property
    def spec(self) -> str | None:
        return "exact:case-sensitive" if self.case_sensitive else "exact"

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

    An expression is evaluated whole or not at all, never read as its first number (math-verify
    alone reads the plain-text `2^{10}` as 2): LaTeX written outside math delimiters (`2^{10}`,
    `3 \\times 10^6`) is delimited before parsing, so that it is parsed as LaTeX; a plain number is
    taken only where it stands alone (see `_stands_alone`); bold `**` is dropped; `1.000.000`,
    `1\\,000` and `1.5e3` are read as the numbers they are (see `_plain_numbers`); a decimal that
    rounds to an integer equals it (see `_evaluated`); and an answer whose text was found but did
    not parse is `unparseable`, not `incorrect`.
    """

    name = "math-verify"
    version = "2"

    def __init__(self, gold_format: str = "latex", timeout_s: float = 5.0, float_rounding: int = 6):
        if gold_format not in ("latex", "number"):
            raise ValueError(f"gold_format must be 'latex' or 'number', got {gold_format!r}")
        self.gold_format, self.timeout_s, self.float_rounding = gold_format, timeout_s, float_rounding
        self._call = TimeBoundCall(_math_verdict, timeout_s, prepare=_import_math_verify)

    def config(self) -> dict:
        return {
            "gold_format": self.gold_format,
            "prediction": "latex(boxed first; latex, units, malformed operators, nits normalised) + expr"
            "; bare latex delimited; bold dropped; expr numbers standing alone; 1.000.000, 1\\,000, 1.5e3 read"
            "; floats rounding to integers are integers; unparsed text unparseable",
            "float_rounding": self.float_rounding,
            "timeout_s": self.timeout_s,
            "math_verify": metadata.version("math-verify"),
        }

    @property
    def spec(self) -> str | None:
        return (
            f"math-verify:{self.gold_format}" if (self.timeout_s, self.float_rounding) == (5.0, 6) else None
        )

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
    from math_verify.parser import extract_target_from_pred, get_extraction_regexes

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
    # `parse`, with plain-expression numbers that must stand alone; its error handling is kept.
    targets = [
        (patterns if isinstance(config, LatexExtractionConfig) else _standing_alone(patterns), config)
        for patterns, config in get_extraction_regexes(prediction_config)
    ]
    text = _delimit_bare_latex(_plain_numbers(_BOLD.sub("", final)))
    try:
        prediction = extract_target_from_pred(text, targets, fallback_mode="first_match")
    except Exception:  # as in `parse`: an answer that breaks the parser is no answer
        log.debug("math-verify could not parse %r", final, exc_info=True)
        prediction = []
    if not prediction:
        return "unparseable", None
    prediction = [_evaluated(answer, float_rounding) for answer in prediction]
    correct = verify(gold_parsed, prediction, float_rounding=float_rounding, timeout_seconds=None)
    if not correct and all(isinstance(answer, str) for answer in prediction):
        return "unparseable", None  # only the text of an answer that did not parse, unlike the gold's
    return ("correct" if correct else "incorrect"), str(prediction[-1])


def _evaluated(answer, float_rounding: int):
    """A number with a decimal in it (`1.1 \\times 10^{2}`, `110.0000001`), evaluated and, when it
    rounds to an integer at `float_rounding` digits, that integer. math-verify rounds floats before
    comparing them, but with SymPy ≥ 1.13 a float never equals an integer (`Float(110.0) !=
    Integer(110)`), and an unevaluated product is compared exactly (1.1·100 = 110.00000000000001)."""
    import sympy

    if not (isinstance(answer, sympy.Expr) and answer.is_number and answer.has(sympy.Float)):
        return answer
    if answer.has(sympy.UnevaluatedExpr):  # math-verify's percentages: `9\\%` must still equal 9
        return answer
    value = answer.doit()
    if value.is_Float and float(value.round(float_rounding)).is_integer():
        return sympy.Integer(int(value.round(float_rounding)))
    return value


def _standing_alone(patterns: list[tuple[re.Pattern[str], int]]) -> list[tuple[_StandingAlone, int]]:
    return [(_StandingAlone(pattern), priority) for pattern, priority in patterns]


class _StandingAlone:
    """One of math-verify's plain-expression patterns, keeping only the matches whose number or
    expression stands alone: math-verify takes a number followed by anything ("100m2" → 100), which
    reads `2^{10}` as 2 and `1.000.000` as 1. `extract_target_from_pred` only calls `finditer`."""

    def __init__(self, pattern: re.Pattern[str]):
        self.pattern = pattern

    def finditer(self, text: str) -> Iterator[re.Match[str]]:
        return (match for match in self.pattern.finditer(text) if _stands_alone(text, *_answer_span(match)))


def _answer_span(match: re.Match[str]) -> tuple[int, int]:
    """Where the expression or number (with its percent sign) that a math-verify match captured is."""
    groups = {name: value for name, value in match.groupdict().items() if value}
    if "expr" in groups:
        start = match.start("expr")
        return start, start + len(groups["expr"].rstrip())
    numbers = [name for name in groups if name.startswith(("integer", "decimal"))]
    if not numbers:
        return match.span()
    start, end = min(match.start(n) for n in numbers), max(match.end(n) for n in numbers)
    return start, match.end("percent") if "percent" in groups else end


# Markdown bold, opening (`**` before a word) or closing (after one), not Python's power `2**10`:
# math-verify's plain expressions take `2 * 2**` for an expression and fail to parse it.
_BOLD = re.compile(r"(?<![\w*])\*\*(?=[^\s*])|(?<=[^\s*])\*\*(?![\w*])")


def _plain_numbers(text: str) -> str:
    """Numbers that math-verify misreads, written plainly: `1.000.000` → `1000000` (two or more
    `.`-groups of three digits can only be thousands; math-verify reads 1.0*0.0), `1\\,000` → `1000`
    (LaTeX's thin space; it reads 1*0) and `1.5e3` → `1500` (it reads 1.5, or 1.5·e·3 in LaTeX)."""
    text = _DOT_THOUSANDS.sub(lambda number: number.group().replace(".", ""), text)
    text = _THIN_SPACE_THOUSANDS.sub(lambda number: number.group().replace("\\,", ""), text)
    return _E_NOTATION.sub(lambda number: format(Decimal(number.group()), "f"), text)


_THIN_SPACE_THOUSANDS = re.compile(r"(?<![\w.,])\d{1,3}(?:\\,\d{3})+(?!\w|[.,]\d)")
_E_NOTATION = re.compile(r"(?<![\w.,])\d+(?:\.\d+)?[eE][-+]?\d{1,3}(?!\w|[.,]\d)")


# Math that is already delimited, which bare LaTeX is looked for outside of: `$…$`, `$$…$$`, `\(…\)`,
# `\[…\]`, `\begin{…}…\end{…}`, and `\boxed{` up to its closing brace.
_MATH_ENV = re.compile(
    r"(?<!\\)\$\$.*?(?<!\\)\$\$|(?<![\\\d])\$(?:\\\$|[^\n$])*?(?<!\\)\$|\\\(.*?\\\)|\\\[.*?\\\]"
    r"|\\begin\{(?P<env>[^{}]+)\}.*?\\end\{(?P=env)\}|\\boxed\{",
    re.DOTALL,
)
# A run of math on one line: numbers, commands, `\text{…}`, single letters, operators and brackets.
_BARE_MATH = re.compile(
    r"(?:(?:\\(?:text|mbox|mathrm)\{[^{}\n]*\}|\\[A-Za-z]+|\\[,;!%$]|\d+(?:[.,]\d+)*"
    r"|(?<![A-Za-z\\])[A-Za-z](?![A-Za-z])|[\^_{}()\[\]+\-*/=<>!|])[ \t]*)+"
)


def _delimit_bare_latex(text: str) -> str:
    """Wraps LaTeX written outside math delimiters in `\\(…\\)`: math-verify looks for LaTeX only in
    delimiters and would otherwise read `The answer is 2^{10}.` as a plain expression, i.e. 2."""
    pieces, done = [], 0
    while env := _MATH_ENV.search(text, done):
        end = _closing_brace(text, env.end()) if env.group() == "\\boxed{" else env.end()
        pieces += [_BARE_MATH.sub(_delimited, text[done : env.start()]), text[env.start() : end]]
        done = end
    return "".join(pieces) + _BARE_MATH.sub(_delimited, text[done:])


def _closing_brace(text: str, start: int) -> int:
    """The end of the group that an opening brace just before `start` opens (the text's end if none)."""
    depth = 1
    for position in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[position], 0)
        if depth == 0:
            return position + 1
    return len(text)


def _delimited(run: re.Match[str]) -> str:
    """A run of bare math, its LaTeX part wrapped in `\\(…\\)` if it has one (a command, a brace,
    `^` or `_`) and its braces and parentheses are balanced; otherwise the run unchanged."""
    text = run.group()
    start, end = _math_bounds(text)
    math = text[start:end]
    balanced = math.count("{") == math.count("}") and math.count("(") == math.count(")")
    if not balanced or not re.search(r"\\[A-Za-z,]|[{_^]", math):
        return text  # plain expressions are math-verify's own; an unbalanced run is left alone
    return f"{text[:start]}\\({math}\\){text[end:]}"


def _math_bounds(run: str) -> tuple[int, int]:
    """The run without what cannot begin or end math: spaces, operators, a loose word ("a", the
    `x` of `x = …`), unclosed brackets. In linear time: a run can be long."""
    start, end = 0, len(run)
    while start < end and (run[start] in " \t=*/<>!|)}]" or _loose_letter(run, start)):
        start += 1
    while end > start and (run[end - 1] in " \t=+-*/<>|({[" or _loose_letter(run, end - 1)):
        end -= 1
    return start, end


def _loose_letter(run: str, i: int) -> bool:
    """A letter with a space on one side: a word ("a", "I") or an equation's variable, not a factor."""
    before, after = run[i - 1 : i], run[i + 1 : i + 2]
    single = run[i].isalpha() and not (before.isalpha() or before == "\\" or after.isalpha())
    return single and (before.isspace() or after.isspace())


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
