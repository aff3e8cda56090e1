"""Property tests: a grader reads an answer's whole value or calls it unparseable, never its first number.

Answers are built from a value as models write them: numbers with thousands separators (`1,234`,
`1.000.000`, `1\\,000`), units, powers, products and scientific notation, inside LaTeX wrappers,
bold and answer sentences. Each is graded against its value and against its leading number: the
label must be the value's (correct for the value, incorrect for a different leading number) or
`unparseable`, and a plain number must always be read.
"""

from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction

import pytest
from helpers import problem
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from reasondistill.verify.graders import MathGrader, NumericGrader


@dataclass(frozen=True)
class Written:
    text: str  # the answer as a model might write it
    value: Fraction  # what it evaluates to
    leading: Fraction  # the first number in it, which a careless reader takes for the answer
    plain: bool  # a number (separators, units, `1.5e3` notation), not an expression: must be read


def _decimal(value: Fraction) -> str:
    """The exact decimal of a value with a terminating expansion (every value built here has one)."""
    if value.denominator == 1:
        return str(value.numerator)
    return f"{Decimal(value.numerator) / Decimal(value.denominator):f}"


@st.composite
def plain_numbers(draw) -> Written:
    """A number, written plainly, in `e` notation, or with `,`, `.` (European, two groups or more) or
    `\\,` thousands."""
    style = draw(st.sampled_from(["plain", "decimal", "e", "comma", "dot", "thin"]))
    if style == "e":
        mantissa = Decimal(draw(st.integers(1, 999))) / 100  # 0.01 … 9.99
        power = draw(st.integers(-3, 12))
        sign = "+" if power >= 0 and draw(st.booleans()) else ""
        text = f"{mantissa}{draw(st.sampled_from('eE'))}{sign}{power}"
        return Written(text, Fraction(mantissa) * Fraction(10) ** power, Fraction(mantissa), plain=True)
    if style == "decimal":
        number = draw(st.decimals(min_value=-(10**6), max_value=10**6, places=2, allow_nan=False))
        return Written(f"{number:f}", Fraction(number), Fraction(number), plain=True)
    if style == "plain":
        number = draw(st.integers(-(10**9), 10**9))
        return Written(str(number), Fraction(number), Fraction(number), plain=True)
    number = draw(st.integers(10**6 if style == "dot" else 1000, 10**10))
    grouped = f"{number:,}"
    leading = Fraction(grouped.split(",")[0])
    text = grouped.replace(",", {"comma": ",", "dot": ".", "thin": "\\,"}[style])
    return Written(text, Fraction(number), leading, plain=True)


@st.composite
def expressions(draw) -> Written:
    """An expression around numbers: a power, a product, or scientific notation."""
    kind = draw(st.sampled_from(["power", "product", "scientific"]))
    if kind == "power":
        base, power = draw(st.integers(2, 12)), draw(st.integers(2, 6))
        text = draw(st.sampled_from(["{}^{{{}}}", "{}^{}"])).format(base, power)
        return Written(text, Fraction(base**power), Fraction(base), plain=False)
    if kind == "product":
        a, b = draw(st.integers(2, 999)), draw(st.integers(2, 999))
        text = draw(st.sampled_from(["{} \\times {}", "{} \\cdot {}", "{}\\times{}", "{} * {}"])).format(a, b)
        return Written(text, Fraction(a * b), Fraction(a), plain=False)
    mantissa = Decimal(draw(st.integers(11, 99))) / 10  # 1.1 … 9.9
    power = draw(st.integers(1, 6))
    text = draw(
        st.sampled_from(["{} \\times 10^{{{}}}", "{} \\cdot 10^{}", "{}\\times10^{{{}}}", "{} * 10^{}"])
    )
    value = Fraction(mantissa) * 10**power
    return Written(text.format(mantissa, power), value, Fraction(mantissa), plain=False)


# Templates: `@` stands for what they wrap.
TEXT_UNITS = ["@", "@ dollars", "$@", "@%", "@ cm"]
LATEX_UNITS = ["@", "@\\%", "\\$@", "@ \\text{ cm}"]
TEXT_WRAPPERS = ["@", "**@**"]
LATEX_WRAPPERS = ["$@$", "\\(@\\)", "\\boxed{@}"]
SENTENCES = ["@", "The answer is @.", "#### @", "Final answer: @", "She has 3 bags. So the answer is @."]


@st.composite
def answers(draw) -> tuple[str, Written, bool]:
    """(a final text, what its answer is, whether it must be read)."""
    written = draw(st.one_of(plain_numbers(), expressions()))
    in_latex = draw(st.booleans())
    wrapper = draw(st.sampled_from(LATEX_WRAPPERS if in_latex else TEXT_WRAPPERS))
    unit = draw(st.sampled_from(LATEX_UNITS if in_latex else TEXT_UNITS)) if written.plain else "@"
    sentence = draw(st.sampled_from(SENTENCES))
    final = sentence.replace("@", wrapper.replace("@", unit.replace("@", written.text)))
    alone_with_a_word = sentence == "@" and any(word in unit for word in ("dollars", "cm"))
    return final, written, written.plain and not alone_with_a_word


def assert_graded_by_its_value(grader, final: str, written: Written, must_read: bool, gold_text=_decimal):
    for gold in {written.value, written.leading}:
        label = grader.grade(final, problem(gold_text(gold))).label
        expected = "correct" if gold == written.value else "incorrect"
        assert label in ({expected} if must_read else {expected, "unparseable"}), (final, str(gold), label)


NUMERIC = NumericGrader()


@settings(max_examples=400, deadline=None, derandomize=True)
@given(answers())
def test_the_numeric_grader_reads_a_whole_number_or_nothing(answer):
    final, written, must_read = answer
    assert_graded_by_its_value(NUMERIC, final, written, must_read)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(answers())
def test_the_last_number_fallback_never_takes_a_number_out_of_an_expression(answer):
    final, written, _ = answer
    assert_graded_by_its_value(NumericGrader(last_number_fallback=True), final, written, must_read=False)


@pytest.fixture(scope="module")
def math_graders():
    return {"number": MathGrader(gold_format="number", timeout_s=5.0), "latex": MathGrader(timeout_s=5.0)}


@settings(max_examples=50, deadline=None, derandomize=True)
@given(answers(), st.sampled_from(["number", "latex"]))
def test_math_verify_evaluates_a_whole_expression_or_nothing(math_graders, answer, gold_format):
    final, written, must_read = answer
    assume("%" not in final)  # math-verify lets a percentage equal its number only if it is an integer
    assert_graded_by_its_value(math_graders[gold_format], final, written, must_read)
