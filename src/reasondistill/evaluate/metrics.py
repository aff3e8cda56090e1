"""Accuracy metrics over n graded samples per problem."""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from collections.abc import Sequence

from ..records import GradedTrace

# Above this share of completions without an answer the grader reads, eval and the report warn: the
# model likely answers in a form the grader does not read, and its accuracy understates it.
UNPARSEABLE_WARNING = 0.10


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


def majority_correct(samples: Sequence[GradedTrace]) -> bool:
    """maj@k of one problem: the most frequent extracted answer among the parseable samples is graded
    (a tie goes to the answer seen first); no parseable sample counts as wrong."""
    votes = Counter(s.extracted for s in samples if s.extracted is not None)
    if not votes:
        return False
    winner = votes.most_common(1)[0][0]  # Counter keeps first-seen order among equal counts
    return next(s.label == "correct" for s in samples if s.extracted == winner)


def unparseable_share(per_problem: Sequence[Sequence[GradedTrace]]) -> float:
    """The share of all samples whose answer the grader could not read (or that were cut off)."""
    labels = [s.label for samples in per_problem for s in samples]
    return mean([label == "unparseable" for label in labels])


def summarise(
    per_problem: Sequence[Sequence[GradedTrace]], difficulties: Sequence[int | None] | None = None
) -> dict:
    """Metrics over n graded samples of each problem.

    accuracy = pass@1 as the mean over all samples; pass@k by the unbiased estimator; maj@k over
    each problem's first k samples; mean and median completion tokens; correct answers per 1,000
    generated tokens (= accuracy / mean tokens × 1000); the share of samples without an answer the
    grader reads (`unparseable_share`); and accuracy by difficulty when problems have one
    (`difficulties`, one per problem).
    """
    n = len(per_problem[0])
    if any(len(samples) != n for samples in per_problem):
        raise ValueError("every problem needs the same number of samples")
    correct = [[s.label == "correct" for s in samples] for samples in per_problem]
    tokens = [s.completion_tokens for samples in per_problem for s in samples]
    summary = {
        "problems": len(per_problem),
        "samples_per_problem": n,
        "accuracy": mean([mean(row) for row in correct]),
        **{f"pass@{k}": mean([pass_at_k(n, sum(row), k) for row in correct]) for k in k_values(n)},
        **{f"maj@{k}": mean([majority_correct(s[:k]) for s in per_problem]) for k in k_values(n) if k > 1},
        "mean_completion_tokens": mean(tokens),
        "median_completion_tokens": statistics.median(tokens),
        "correct_per_1k_tokens": 1000 * sum(map(sum, correct)) / max(1, sum(tokens)),
        "labels": dict(Counter(s.label for samples in per_problem for s in samples)),
        "unparseable_share": unparseable_share(per_problem),
    }
    by_level: dict[int, list[list[bool]]] = defaultdict(list)
    for level, row in zip(difficulties or [None] * len(correct), correct, strict=True):
        if level is not None:
            by_level[level].append(row)
    if by_level:
        summary["by_difficulty"] = {
            str(level): {"problems": len(rows), "accuracy": mean([mean(row) for row in rows])}
            for level, rows in sorted(by_level.items())
        }
    return summary
