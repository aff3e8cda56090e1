from itertools import combinations
from math import comb

import pytest
from hypothesis import given
from hypothesis import strategies as st

from reasondistill.evaluate.metrics import k_values, majority_correct, pass_at_k, summarise
from reasondistill.records import GradedTrace


@given(n=st.integers(1, 12), data=st.data())
def test_pass_at_k_is_the_probability_that_a_random_k_subset_holds_a_correct_sample(n, data):
    c = data.draw(st.integers(0, n))
    k = data.draw(st.integers(1, n))
    samples = [True] * c + [False] * (n - c)
    subsets = list(combinations(range(n), k))
    brute_force = sum(any(samples[i] for i in s) for s in subsets) / len(subsets)
    assert pass_at_k(n, c, k) == pytest.approx(brute_force)
    assert pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k))


def test_pass_at_k_rejects_impossible_counts():
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def sample(label: str, extracted: str | None, tokens: int = 10) -> GradedTrace:
    return GradedTrace(
        problem_id="p", task="t", sample_idx=0, source="{}", completion="", reasoning=None, final="",
        prompt_tokens=1, completion_tokens=tokens, finish_reason="stop", label=label, extracted=extracted,
        grader="g",
    )  # fmt: skip


RIGHT, WRONG, NONE = ("correct", "7"), ("incorrect", "5"), ("unparseable", None)


def test_summary_metrics_against_hand_computed_values():
    assert k_values(1) == [1] and k_values(4) == [1, 2, 4] and k_values(6) == [1, 2, 4, 6]
    per_problem = [
        [
            sample(*RIGHT, tokens=10),
            sample(*WRONG, tokens=20),
            sample(*WRONG, tokens=30),
            sample(*NONE, tokens=40),
        ],
        [sample(*RIGHT, tokens=1)] * 4,
        [sample(*NONE, tokens=5)] * 4,
    ]
    summary = summarise(per_problem, difficulties=[1, 1, 2])
    assert summary["accuracy"] == pytest.approx((0.25 + 1.0 + 0.0) / 3)
    assert summary["pass@1"] == pytest.approx(summary["accuracy"])
    assert summary["pass@2"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)  # 1 - C(3,2)/C(4,2) = 0.5
    assert summary["pass@4"] == pytest.approx(2 / 3)
    # maj@2: problem 1 ties 7 vs 5 → the first seen (7, right); maj@4: 5 wins 2 to 1 → wrong.
    assert (summary["maj@2"], summary["maj@4"]) == (pytest.approx(2 / 3), pytest.approx(1 / 3))
    assert summary["mean_completion_tokens"] == pytest.approx((100 + 4 + 20) / 12)
    assert summary["median_completion_tokens"] == 5
    assert summary["correct_per_1k_tokens"] == pytest.approx(1000 * 5 / 124)
    assert summary["labels"] == {"correct": 5, "incorrect": 2, "unparseable": 5}
    assert summary["unparseable_share"] == pytest.approx(5 / 12)
    assert summary["by_difficulty"] == {
        "1": {"problems": 2, "accuracy": pytest.approx(0.625)},
        "2": {"problems": 1, "accuracy": 0.0},
    }
    assert "by_difficulty" not in summarise(per_problem)


def test_majority_vote_ignores_unparseable_samples_and_needs_one_answer():
    assert majority_correct([sample(*NONE), sample(*NONE), sample(*RIGHT)])
    assert not majority_correct([sample(*NONE), sample(*NONE)])
    assert not majority_correct([sample(*WRONG), sample(*RIGHT), sample(*WRONG)])
