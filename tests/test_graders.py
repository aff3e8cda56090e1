import pytest

from reasondistill.records import Message, Problem
from reasondistill.verify.graders import AnswerIsGrader
from reasondistill.verify.reasoning import format_completion, split_reasoning

INTEGER = AnswerIsGrader("integer")
LABEL = AnswerIsGrader("label", ("True", "False", "Unknown"))


def problem(answer: str) -> Problem:
    return Problem(id="p", task="t", messages=[Message(role="user", content="q")], answer=answer)


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
    assert INTEGER.id.startswith("answer-is-integer@1+")
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
