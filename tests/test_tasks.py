import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reasondistill.errors import UserError
from reasondistill.tasks import TASKS, get_task
from reasondistill.tasks.base import split_of
from reasondistill.tasks.logic import LABELS

TASK_NAMES = sorted(TASKS)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_generation_is_seeded_and_reproducible(name):
    task = get_task(name)
    first, again, other = (task.sample("train", 30, seed) for seed in (7, 7, 8))
    assert first == again
    assert [p.id for p in first] != [p.id for p in other]


@pytest.mark.parametrize("name", TASK_NAMES)
def test_problems_are_chat_messages_with_gold_solutions_the_grader_accepts(name):
    task = get_task(name)
    for problem in task.sample("test", 50, seed=0):
        assert [m.role for m in problem.messages] == ["user"]
        assert (
            problem.solution.startswith("<think>\n")
            and f"The answer is {problem.answer}." in problem.solution
        )
        assert task.grader.grade(problem.solution, problem).label == "correct"


@pytest.mark.parametrize("name", TASK_NAMES)
def test_a_changed_final_answer_is_graded_incorrect(name):
    task = get_task(name)
    for problem in task.sample("train", 50, seed=1):
        wrong = (
            str(int(problem.answer) + 1)
            if problem.answer.isdigit()
            else next(label for label in LABELS if label != problem.answer)
        )
        assert (
            task.grader.grade(
                problem.solution.replace(f"is {problem.answer}.", f"is {wrong}."), problem
            ).label
            == "incorrect"
        )


@pytest.mark.parametrize("name", TASK_NAMES)
def test_train_and_test_splits_are_disjoint_by_construction(name):
    task = get_task(name)
    train = task.sample("train", 200, seed=0)
    test = task.sample("test", 50, seed=0)
    assert not {p.messages[0].content for p in train} & {p.messages[0].content for p in test}
    assert all(split_of(p.messages[0].content) == "test" for p in test)
    assert len({p.id for p in train}) == len(train)


def test_arithmetic_difficulty_is_the_number_of_digits_and_answers_are_sums():
    task = get_task("arithmetic")
    for digits in (1, 3, 5):
        for problem in task.sample("train", 20, seed=0, difficulties=[digits]):
            a, b = json.loads(problem.meta)["operands"]
            assert len(str(a)) == len(str(b)) == digits == problem.difficulty
            assert int(problem.answer) == a + b
            assert problem.solution.count("carry") >= digits  # one line per column


def test_word_problem_difficulty_is_the_number_of_equations():
    task = get_task("word_problems")
    for steps in (2, 4, 6):
        for problem in task.sample("train", 20, seed=0, difficulties=[steps]):
            reasoning = problem.solution.split("</think>")[0]
            equations = re.findall(r"(\d+) ([-+*/]) (\d+) = (\d+)\.", reasoning)
            assert len(equations) == steps
            for left, op, right, result in equations:  # every step is arithmetically right
                assert {"+": int.__add__, "-": int.__sub__, "*": int.__mul__, "/": int.__floordiv__}[op](
                    int(left), int(right)
                ) == int(result)
            assert equations[-1][3] == problem.answer
            for line in reasoning.removeprefix("<think>").strip().splitlines():  # each line quotes a sentence
                assert line.split(". ")[0] + "." in problem.messages[0].content


def test_logic_depth_and_balanced_labels():
    task = get_task("logic")
    problems = task.sample("train", 600, seed=0, difficulties=[1, 3, 5])
    counts = {label: sum(p.answer == label for p in problems) for label in LABELS}
    assert all(150 <= c <= 250 for c in counts.values()), counts
    for p in problems:
        assert json.loads(p.meta)["depth"] == p.difficulty
        if p.answer != "Unknown":  # a decided proof uses one rule per level of depth
            assert (
                p.solution.count(f"{p.messages[0].content.split()[1]} is ")
                and p.solution.count(" if ") == p.difficulty
            )


@given(seed=st.integers(0, 10**6), difficulty=st.integers(1, 5))
@settings(max_examples=60, deadline=None)
def test_logic_gold_label_follows_from_forward_chaining(seed, difficulty):
    problem = get_task("logic").sample("train", 1, seed, [difficulty])[0]
    last_line = problem.solution.split("</think>")[0].strip().splitlines()[-1]
    expected = {"So": "True", "Nothing": "Unknown"}.get(last_line.split()[0])
    if " is not " in last_line:
        expected = "False"
    assert expected == problem.answer


def test_backward_chaining_stops_at_the_first_unknown_condition():
    from reasondistill.tasks.logic import Rule, backward_chain

    rules = [Rule(("kind", "big"), "nice"), Rule(("red",), "kind"), Rule(("nice",), "cold", negated=True)]
    label, lines = backward_chain("Bob", "cold", {"red", "big"}, rules)
    assert label == "False" and lines[-1] == "So Bob is not cold."
    assert lines[:3] == [
        "Bob is not cold if Bob is nice.",
        "Bob is nice if Bob is kind and big.",
        "Bob is kind if Bob is red.",
    ]
    label, lines = backward_chain("Bob", "nice", {"big"}, rules)
    assert (
        label == "Unknown"
        and "Bob is red: not known." in lines
        and not any("big" in line and "fact" in line for line in lines)
    )
    assert backward_chain("Bob", "tall", {"big"}, rules)[0] == "Unknown"


def test_bad_requests_are_clear_errors():
    with pytest.raises(UserError, match="difficulty 9 is out of range 1..6"):
        get_task("arithmetic").sample("train", 5, 0, [9])
    with pytest.raises(UserError, match="found only .* distinct test problems"):
        get_task("arithmetic").sample("test", 500, 0, [1])
    with pytest.raises(UserError, match="unknown task 'algebra'"):
        get_task("algebra")
