import pytest
from helpers import SHARED_BENCHMARKS, problem
from hypothesis import given
from hypothesis import strategies as st

from reasondistill.tasks import default_grader, get_benchmark
from reasondistill.verify.graders import (
    AnswerIsGrader,
    ChoiceGrader,
    ExactStringGrader,
    LabelGrader,
    MathGrader,
    NumericGrader,
    Verdict,
    grader_from_spec,
)
from reasondistill.verify.reasoning import format_completion, split_reasoning

INTEGER = AnswerIsGrader("integer")
LABEL = AnswerIsGrader("label", ("True", "False", "Unknown"))


@pytest.mark.parametrize(
    "completion, label, extracted",
    [
        ("<think>\n2 + 2 = 4\n</think>\nThe answer is 4.", "correct", "4"),
        ("<think>x</think>The answer is 1,234.", "correct", "1234"),  # gold 1234
        ("<think>x</think>the answer is: 1234", "correct", "1234"),
        ("The answer is 1234.", "correct", "1234"),  # no reasoning block at all
        (
            "<think>x</think>The answer is 5. Wait, no. The answer is 1234.",
            "correct",
            "1234",
        ),  # last statement counts
        ("<think>x</think>The answer is 1235.", "incorrect", "1235"),
        (
            "<think>The answer is 1234.</think>I am not sure.",
            "unparseable",
            None,
        ),  # only the final part is graded
        ("<think>The answer is 1234. still thinking", "unparseable", None),  # reasoning never closed
        ("<think>x</think>The answer is twelve.", "unparseable", None),
        ("<think>x</think>The answer is 1234 + 1.", "unparseable", None),  # an expression, not 1234
        ("<think>x</think>The answer is 1234 \\times 10^3.", "unparseable", None),
        ("<think>x</think>The answer is 1234. 5 is wrong.", "correct", "1234"),
        ("", "unparseable", None),
    ],
)
def test_integer_grader(completion, label, extracted):
    gold = "1234" if "1234" in completion or "1,234" in completion or "1235" in completion else "4"
    verdict = INTEGER.grade(completion, problem(gold))
    assert (verdict.label, verdict.extracted) == (label, extracted)


def test_a_truncated_completion_is_never_correct():
    text = "<think>x</think>The answer is 4."
    assert INTEGER.grade(text, problem("4"), finish_reason="stop").label == "correct"
    assert INTEGER.grade(text, problem("4"), finish_reason="length").label == "unparseable"


@pytest.mark.parametrize(
    "final, label",
    [("The answer is True.", "correct"), ("the answer is true", "correct"), ("The answer is False.", "incorrect"),
     ("The answer is Maybe.", "unparseable"), ("True", "unparseable")],
)  # fmt: skip
def test_label_grader(final, label):
    assert LABEL.grade(f"<think>r</think>\n{final}", problem("True")).label == label


def test_grader_ids_are_stable_and_depend_on_configuration():
    assert INTEGER.id == AnswerIsGrader("integer").id
    assert INTEGER.id.startswith("answer-is-integer@2+") and LABEL.id.startswith("answer-is-label@1+")
    assert LABEL.id != AnswerIsGrader("label", ("yes", "no")).id


def test_split_reasoning_handles_every_shape():
    assert split_reasoning("<think>\nr\n</think>\nfinal") == split_reasoning(
        "r</think>final"
    )  # tag opened in the prompt
    assert split_reasoning("no tags").reasoning is None
    unclosed = split_reasoning("<think>half a thought")
    assert (unclosed.closed, unclosed.final) == (False, "")
    text = format_completion("step 1\nstep 2", "The answer is 3.")
    split = split_reasoning(text)
    assert format_completion(split.reasoning, split.final) == text


NUMERIC = NumericGrader()


@pytest.mark.parametrize(
    "final, gold, label",
    [
        ("Janet makes 9 * 2 = $18 every day.\n#### 18", "18", "correct"),
        ("The answer is 18.", "18", "correct"),
        ("So she pays \\boxed{18} dollars.", "18", "correct"),
        ("The final answer is $1,234.50.", "1234.5", "correct"),
        ("#### 2,125", "2125", "correct"),
        ("The answer is 18.00", "18", "correct"),
        ("The answer is 3/4", "0.75", "correct"),
        ("The answer is -7.", "-7", "correct"),
        ("#### 19", "18", "incorrect"),
        ("The answer is 5. No wait, the answer is 18.", "18", "correct"),  # the last statement counts
        ("\\boxed{18} ... #### 19", "18", "correct"),  # boxed is preferred over ####
        ("She has 18 apples.", "18", "unparseable"),  # no stated answer, and no fallback
        ("The answer is eighteen.", "18", "unparseable"),
    ],
)
def test_numeric_grader(final, gold, label):
    assert NUMERIC.grade(final, problem(gold)).label == label


def test_numeric_grader_last_number_fallback_is_opt_in_and_changes_the_id():
    lenient = NumericGrader(last_number_fallback=True)
    assert lenient.grade("She has 18 apples.", problem("18")).label == "correct"
    assert lenient.id != NUMERIC.id


@pytest.mark.parametrize(
    "final, strict, flexible",
    [
        ("A: 18", "unparseable", "correct"),  # another answer format: strict reads nothing, flexible 18
        ("So she pays 18 dollars in total.", "unparseable", "correct"),
        ("She pays 3 + 4 = 17 dollars.", "unparseable", "incorrect"),  # the last number, and it is wrong
        ("#### 18", "correct", "correct"),  # where strict reads an answer, flexible reads the same
        ("The answer is 17, not 18.", "incorrect", "incorrect"),
        ("Half of 36 is 2^{10}", "unparseable", "unparseable"),  # no number stands alone at the end
    ],
)
def test_the_flexible_twin_of_the_strict_numeric_grader_reads_the_last_number(final, strict, flexible):
    """eval's strict-match and flexible-extract (as lm-eval-harness reports GSM8K)."""
    assert NUMERIC.flexible().id == NumericGrader(last_number_fallback=True).id
    assert NUMERIC.grade(final, problem("18")).label == strict
    assert NUMERIC.flexible().grade(final, problem("18")).label == flexible
    assert NUMERIC.flexible().flexible() is None and grader_from_spec("math-verify:number").flexible() is None


@pytest.mark.parametrize(
    "final",
    [
        "The answer is 2^{10}.",
        "The answer is $2^{10}$.",
        "\\boxed{2^{10}}",
        "#### 2^10",
        "10^{10^{10^{10}}}",
        "The answer is 3 \\times 10^6.",
        "Final answer: 3 \\cdot 10^{6}",
        "The answer is 3 * 10^6.",
        "The answer is 2x.",
        "The answer is 1.2.3.",
        "The answer is 1,2345.",
        "The answer is 1 234.",
        "The answer is 2 (3 + 4).",
    ],
)
def test_an_expression_is_never_read_as_its_first_number(final):
    """The numeric grader evaluates no expressions: one in the answer slot is unparseable."""
    for gold in ("2", "10", "3", "1", "1024", "3000000"):
        assert NUMERIC.grade(final, problem(gold)) == Verdict("unparseable", None), (final, gold)


@pytest.mark.parametrize(
    "final, extracted",
    [
        ("The answer is 1.000.000.", "1.000.000"),  # European thousands: one million, not 1
        ("#### 1.000.000", "1.000.000"),
        ("\\boxed{1\\,000\\,000}", "1\\,000\\,000"),  # LaTeX thin-space thousands
        ("\\boxed{1{,}000{,}000}", "1{,}000{,}000"),
        ("The answer is 1e6.", "1e6"),  # e notation is a number, read exactly
        ("The answer is 1,000,000 dollars.", "1,000,000"),
    ],
)
def test_numeric_grader_reads_thousands_separators_and_e_notation_as_the_whole_number(final, extracted):
    assert NUMERIC.grade(final, problem("1000000")) == Verdict("correct", extracted)
    assert NUMERIC.grade(final, problem("1")).label == "incorrect"


@pytest.mark.parametrize(
    "final, extracted",
    [
        ("**73**", "73"),
        ("The answer is **73**.", "73"),
        ("**Final Answer:** $73$", "73"),
        ("#### **73**", "73"),
        ("\\boxed{x = 73}", "73"),
        ("The answer is x = 73.", "73"),
        ("The answer is $n = 73$.", "73"),
        ("$73$", "73"),
        ("The answer is 73 dollars.", "73"),
        ("The answer is $73.", "73"),
        ("The answer is 73%.", "73"),
        ("The answer is 73 cm.", "73"),
        ("The answer is $73/hour.", "73"),
        ("The answer is 73 (rounded down).", "73"),
        ("\\boxed{73 \\text{ cm}}", "73"),
        ("\\boxed{73\\%}", "73"),
        ("\\boxed{\\$73}", "\\$73"),
        ("The answer is 73!", "73"),  # an exclamation mark, not 73 factorial
    ],
)
def test_numeric_grader_reads_bold_variables_and_units_around_the_number(final, extracted):
    assert NUMERIC.grade(final, problem("73")) == Verdict("correct", extracted)


def test_the_last_number_fallback_takes_no_number_out_of_an_expression():
    lenient = NumericGrader(last_number_fallback=True)
    assert lenient.grade("Janet makes 9 * 2 = $18 every day.", problem("18")).label == "correct"
    for final in ("She has 2^{10} apples.", "About 3 \\times 10^6 people came.", "It is 2**10.", "x = 5-3"):
        assert lenient.grade(final, problem("2")).label == "unparseable", final


def test_a_non_numeric_gold_answer_is_an_error_not_a_wrong_answer():
    with pytest.raises(ValueError, match="gold answer 'eighteen' is not a number"):
        NUMERIC.grade("The answer is 18.", problem("eighteen"))


CHOICE = ChoiceGrader("ABCDE")


@pytest.mark.parametrize(
    "final, label, extracted",
    [
        ("The answer is B.", "correct", "B"),
        ("Answer: (B)", "correct", "B"),
        ("$\\boxed{B}$", "correct", "B"),
        ("\\boxed{\\text{B}}", "correct", "B"),
        ("(B)", "correct", "B"),
        ("B", "correct", "B"),
        ("The answer is option C.", "incorrect", "C"),
        ("I think the answer is a bit unclear.", "unparseable", None),  # "a" is not option A
        ("Both A and B look right.", "unparseable", None),
        ("The answer is F.", "unparseable", None),  # not among the choices
    ],
)
def test_choice_grader(final, label, extracted):
    verdict = CHOICE.grade(final, problem("B"))
    assert (verdict.label, verdict.extracted) == (label, extracted)


GSM8K_TEST = SHARED_BENCHMARKS / "gsm8k" / "test.jsonl"


@pytest.mark.skipif(not GSM8K_TEST.exists(), reason=f"{GSM8K_TEST} not present")
def test_every_gsm8k_gold_solution_grades_correct_and_a_changed_number_incorrect():
    problems = get_benchmark("gsm8k").load(GSM8K_TEST)
    grader = default_grader("gsm8k")
    assert len(problems) == 1319 and grader.id == NUMERIC.id
    for p in problems:
        assert grader.grade(p.solution, p).label == "correct", p.id
        wrong = f"{p.solution.rsplit('####', 1)[0]}#### {int(p.answer) + 1}"
        assert grader.grade(wrong, p).label == "incorrect", p.id


@given(
    value=st.decimals(min_value=-(10**9), max_value=10**9, places=2, allow_nan=False, allow_infinity=False)
)
def test_numeric_grader_reads_any_number_in_the_usual_written_forms(value):
    gold = str(value)
    for written in (f"{value:,}", f"${value:,.2f}", f"{value:f}"):
        for final in (f"The answer is {written}.", f"#### {written}", f"\\boxed{{{written}}}"):
            assert NUMERIC.grade(final, problem(gold)).label == "correct", final


LABELS = LabelGrader(("True", "False", "Uncertain"))


@pytest.mark.parametrize(
    "final, label, extracted",
    [
        ("True", "correct", "True"),
        ("**True**.", "correct", "True"),
        ("The answer is true.", "correct", "True"),
        ("**Answer:** True", "correct", "True"),
        ("$\\boxed{\\text{True}}$", "correct", "True"),
        ("The answer is False.", "incorrect", "False"),
        ("The statement is uncertain, so the answer is: Uncertain", "incorrect", "Uncertain"),
        ("It is true that cats purr, so the conclusion follows.", "unparseable", None),  # no stated answer
        ("The answer is Truely unclear.", "unparseable", None),
    ],
)
def test_label_grader_for_benchmark_outputs(final, label, extracted):
    verdict = LABELS.grade(final, problem("True"))
    assert (verdict.label, verdict.extracted) == (label, extracted)
    assert LABELS.id.startswith("label@1+") and LABELS.id != LabelGrader().id


EXACT = ExactStringGrader()


@pytest.mark.parametrize(
    "final, label, extracted",
    [
        ("Lewis is Jason's grandson, so the answer is grandson.", "correct", "grandson"),
        ("The answer is **Grandson**.", "correct", "grandson"),
        ("\\boxed{\\text{grandson}}", "correct", "grandson"),
        ("$\\boxed{grandson}$", "correct", "grandson"),
        ("grandson", "correct", "grandson"),
        ("Answer: great grandson", "incorrect", "great grandson"),
        ("The answer is son. No: the answer is grandson.", "correct", "grandson"),  # the last one counts
        ("Lewis is the son of Scott's brother.\nSo it is hard to say.", "unparseable", None),
        ("", "unparseable", None),
    ],
)
def test_exact_string_grader(final, label, extracted):
    verdict = EXACT.grade(final, problem("grandson"))
    assert (verdict.label, verdict.extracted) == (label, extracted)


def test_exact_string_grader_can_be_case_sensitive():
    strict = ExactStringGrader(case_sensitive=True)
    assert strict.grade("The answer is Paris.", problem("Paris")).label == "correct"
    assert strict.grade("The answer is paris.", problem("Paris")).label == "incorrect"
    assert strict.id != EXACT.id


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("numeric", NumericGrader()),
        ("numeric:last-number", NumericGrader(last_number_fallback=True)),
        ("math-verify:number", MathGrader(gold_format="number")),
        ("choice:ABCD", ChoiceGrader("ABCD")),
        ("label:Yes/No", LabelGrader(("Yes", "No"))),
        ("exact:case-sensitive", ExactStringGrader(case_sensitive=True)),
    ],
)
def test_graders_are_named_by_specs_in_recipes(spec, expected):
    assert grader_from_spec(spec).id == expected.id


@pytest.mark.parametrize("spec", ["numeric:first", "choice:A", "label:Yes", "regex", ""])
def test_an_unknown_grader_spec_is_an_error_listing_the_known_ones(spec):
    with pytest.raises(ValueError, match="unknown grader .*; graders are: numeric, math-verify:latex"):
        grader_from_spec(spec)


def test_verify_and_eval_use_a_tasks_own_grader_unless_overridden():
    from reasondistill.stages.evaluate import EvalConfig
    from reasondistill.stages.verify import VerifyConfig

    overrides = {"gsm8k": "math-verify:number"}
    verify = VerifyConfig(traces="teacher", graders=overrides)
    evaluate = EvalConfig(model=["testbed:student"], benchmarks=["gsm8k", "math500"], graders=overrides)
    for config in (verify, evaluate):
        assert config.grader_for("gsm8k").id == MathGrader(gold_format="number").id
        assert config.grader_for("math500") is default_grader("math500")
        assert config.grader_for("arithmetic") is default_grader("arithmetic")
