"""Accuracy metrics over n graded samples per problem."""

from __future__ import annotations

from collections.abc import Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with c correct out of n samples (Chen et al., 2021).

    pass@k = 1 − C(n−c, k) / C(n, k), computed as 1 − Π_{i=n−c+1}^{n} (1 − k/i) to avoid huge binomials.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    product = 1.0
    for i in range(n - c + 1, n + 1):
        product *= 1.0 - k / i
    return 1.0 - product


def k_values(n: int) -> list[int]:
    """Powers of two up to n, and n itself."""
    ks = [1 << i for i in range(n.bit_length()) if 1 << i <= n]
    return ks if ks[-1] == n else [*ks, n]


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def summarise(correct_per_problem: Sequence[Sequence[bool]], tokens: Sequence[int]) -> dict:
    """Accuracy (pass@1 = mean over all samples), unbiased pass@k, and mean completion tokens."""
    n = len(correct_per_problem[0])
    summary = {
        "problems": len(correct_per_problem),
        "samples_per_problem": n,
        "accuracy": mean([mean([float(x) for x in row]) for row in correct_per_problem]),
        "mean_completion_tokens": mean(tokens),
    }
    for k in k_values(n):
        summary[f"pass@{k}"] = mean([pass_at_k(n, sum(row), k) for row in correct_per_problem])
    return summary
