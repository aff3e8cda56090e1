"""The math-verify grader: real MATH-500 answers, order of arguments, and a time limit that holds anywhere."""

import pickle
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

import pytest
from helpers import SHARED_BENCHMARKS, problem

from reasondistill.tasks import default_grader, get_benchmark
from reasondistill.verify.graders import MathGrader

MATH500 = SHARED_BENCHMARKS / "math500" / "test.jsonl"


@pytest.fixture(scope="module")
def grader():
    return MathGrader(timeout_s=2.0)


@pytest.mark.parametrize(
    "final, gold, label",
    [
        ("So the answer is $\\boxed{\\frac{14}{3}}$.", "\\frac{14}{3}", "correct"),
        ("\\boxed{4.6666666667}", "\\frac{14}{3}", "correct"),  # rounded to float_rounding digits
        ("\\boxed{\\frac{15}{3}}", "\\frac{14}{3}", "incorrect"),
        ("The answer is $x = 101$.", "101", "correct"),
        ("\\boxed{\\frac65}", "\\frac{6}{5}", "correct"),  # shorthand LaTeX is normalised
        ("$\\boxed{3}$ is wrong, the answer is 4", "3", "correct"),  # the boxed answer comes first
        ("I could not solve it.", "\\frac{14}{3}", "unparseable"),
        ("<think>\\boxed{5}", "5", "unparseable"),  # a reasoning block that never closed
    ],
)
def test_math_grader_on_typical_answers(grader, final, gold, label):
    assert grader.grade(final, problem(gold)).label == label


@pytest.fixture(scope="module")
def number_grader():
    return MathGrader(gold_format="number", timeout_s=2.0)


@pytest.mark.parametrize(
    "final, value, leading",
    [
        ("The answer is 2^{10}.", "1024", "2"),  # math-verify alone reads the bare LaTeX as 2
        ("2^{10}", "1024", "2"),
        ("The answer is $2^{10}$.", "1024", "2"),
        ("The answer is 2^10.", "1024", "2"),
        ("**2^{10}**", "1024", "2"),
        ("3 \\times 10^6", "3000000", "3"),
        ("The answer is 3 \\times 10^6.", "3000000", "3"),
        ("Final answer: 3 \\cdot 10^{6}", "3000000", "3"),
        ("The answer is $1.1 \\times 10^{2}$.", "110", "1.1"),  # 110.00000000000001 in floats
        ("The answer is 1.5e3.", "1500", "1.5"),
        ("1.000.000", "1000000", "1"),  # European thousands, read as 1.000 (or 1.0*0.0 in LaTeX)
        ("\\boxed{1.000.000}", "1000000", "1"),
        ("The answer is 1\\,000.", "1000", "1"),  # LaTeX thin-space thousands, read as 1*0
        ("**73**", "73", "7"),
        ("The answer is **73**.", "73", "7"),
        ("\\boxed{x = 3}", "3", "0"),
        ("The answer is 18 dollars.", "18", "1"),
        ("The answer is $18.", "18", "1"),
    ],
)
def test_an_expression_is_evaluated_whole_never_read_as_its_first_number(
    grader, number_grader, final, value, leading
):
    for graded in (grader, number_grader):  # gold as LaTeX and as a plain number
        assert graded.grade(final, problem(value)).label == "correct", (final, graded.gold_format)
        assert graded.grade(final, problem(leading)).label == "incorrect", (final, graded.gold_format)


@pytest.mark.parametrize(
    "final",
    ["The answer is 1.2.3.", "The answer is 2x.", "$2^{10} \\foo{$", "The answer is 100m2.", "**2 ^ {**"],
)
def test_an_answer_that_does_not_parse_whole_is_unparseable_not_its_first_number(number_grader, final):
    for gold in ("1", "2", "100"):
        assert number_grader.grade(final, problem(gold)).label == "unparseable", (final, gold)


@pytest.mark.parametrize("gold_format", ["latex", "number"])
def test_a_tower_of_powers_is_not_its_base_and_is_cut_off_at_the_time_limit(gold_format):
    grader = MathGrader(gold_format=gold_format, timeout_s=1.0)
    grader.grade("\\boxed{1}", problem("1"))  # start the helper outside the measured call
    started = time.monotonic()
    assert grader.grade("10^{10^{10^{10}}}", problem("10")).label == "unparseable"
    assert time.monotonic() - started < 5


def test_a_gold_that_does_not_parse_is_an_error_not_a_wrong_answer(grader):
    with pytest.raises(ValueError, match="the gold answer '' does not parse as latex"):
        grader.grade("\\boxed{5}", problem(""))


@pytest.mark.skipif(not MATH500.exists(), reason=f"{MATH500} not present")
def test_every_math500_gold_solution_grades_correct_against_its_gold_answer():
    problems = get_benchmark("math500").load(MATH500)
    grader = default_grader("math500")
    assert len(problems) == 500 and grader.id == MathGrader(gold_format="latex").id
    wrong = [p.id for p in problems if grader.grade(p.solution, p).label != "correct"]
    assert wrong == []  # no exceptions with the prediction config documented in MathGrader


@pytest.mark.parametrize(
    "adversarial",
    ["$" + "\\frac{1}{" * 400 + "2" + "}" * 400 + "$", "\\boxed{2^{2^{2^{2^{100}}}}}"],
    ids=["nested-frac", "huge-exponent"],
)
def test_an_adversarial_answer_is_cut_off_at_the_time_limit_and_grading_goes_on(adversarial):
    grader = MathGrader(timeout_s=1.0)
    grader.grade("\\boxed{1}", problem("1"))  # start the helper outside the measured call
    started = time.monotonic()
    assert grader.grade(adversarial, problem("1")).label != "correct"
    assert time.monotonic() - started < 5
    assert grader.grade("\\boxed{7}", problem("7")).label == "correct"


def grade_labels(grader: MathGrader, answers: list[int]) -> list[str]:
    return [grader.grade(f"\\boxed{{{a}}}", problem("3")).label for a in answers]


def test_threads_and_worker_processes_grade_like_the_main_thread(grader):
    answers = [3, 4, 3, 5, 3, 6]
    expected = grade_labels(grader, answers)
    assert expected == ["correct", "incorrect"] * 3
    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(lambda a: grade_labels(grader, [a])[0], answers)) == expected
    with ProcessPoolExecutor(2) as pool:
        assert list(pool.map(grade_labels, [grader, pickle.loads(pickle.dumps(grader))], [answers] * 2)) == [
            expected,
            expected,
        ]
