"""Trace statistics of a set of completions, overall and by task, by label and by task and label:
length in tokens and words, reasoning lines and sentences, reflection keywords (occurrences per
trace and the share of traces with at least one). The per-completion counting is
`text.trace_features`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from .selection import Text
from .text import describe, trace_features


def group_stats(rows: Sequence[dict], keywords: Sequence[str]) -> dict:
    """Statistics of a group of traces (rows of `trace_features` plus `tokens`)."""
    tokens = [r["tokens"] for r in rows if r["tokens"] is not None]
    reflecting = [r for r in rows if any(r["keywords"].values())]
    return {
        "traces": len(rows),
        "tokens": describe(tokens),
        "words": describe([r["words"] for r in rows]),
        "lines": describe([r["lines"] for r in rows]),
        "sentences": describe([r["sentences"] for r in rows]),
        "reflections_per_trace": sum(sum(r["keywords"].values()) for r in rows) / len(rows),
        "share_reflecting": len(reflecting) / len(rows),
        "keywords": {
            k: {
                "count": sum(r["keywords"][k] for r in rows),
                "share_of_traces": sum(r["keywords"][k] > 0 for r in rows) / len(rows),
            }
            for k in keywords
        },
    }


def trace_statistics(
    texts: Sequence[Text], keywords: Sequence[str], token_counts: Sequence[int | None]
) -> dict:
    """`group_stats` of all texts and of each group (by task, by label, by task and label); the
    token count of each text is given (None where unknown)."""
    rows = [
        {"task": t.task, "label": t.label, "tokens": n, **trace_features(t.completion, keywords)}
        for t, n in zip(texts, token_counts, strict=True)
    ]
    groups: dict[str, dict[str, list[dict]]] = {"by_task": defaultdict(list), "by_label": defaultdict(list),
                                                "by_task_and_label": defaultdict(list)}  # fmt: skip
    for row in rows:
        groups["by_task"][row["task"]].append(row)
        if row["label"] is not None:
            groups["by_label"][row["label"]].append(row)
            groups["by_task_and_label"][f"{row['task']} / {row['label']}"].append(row)
    return {
        "all": group_stats(rows, keywords),
        **{
            kind: {key: group_stats(members, keywords) for key, members in sorted(grouped.items())}
            for kind, grouped in groups.items()
        },
    }
