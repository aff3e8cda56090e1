from itertools import combinations
from math import comb

import pytest
from hypothesis import given
from hypothesis import strategies as st

from reasondistill.evaluate.metrics import k_values, pass_at_k, summarise


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


def test_k_values_and_summary():
    assert k_values(1) == [1] and k_values(4) == [1, 2, 4] and k_values(6) == [1, 2, 4, 6]
    summary = summarise(
        [[True, False, False, False], [True, True, True, True]], tokens=[10, 20, 30, 40, 1, 1, 1, 1]
    )
    assert summary["accuracy"] == pytest.approx((0.25 + 1.0) / 2)
    assert summary["pass@4"] == pytest.approx(1.0)
    assert summary["pass@1"] == pytest.approx(summary["accuracy"])
    assert summary["mean_completion_tokens"] == pytest.approx(13)
