"""Analyses: where a distilled model's sentences come from (`provenance`), how much of its training
data it reproduces verbatim (`memorization`), and what traces look like (`trace_stats`).

The computations only: the stages of the same names (`stages.provenance`, …) read the run's texts
(`selection`: which set; `store.load_texts`), write analysis/<name>.json and declare the report's
sections. The pure text functions (segmentation into steps, reflection keywords, length statistics)
are in `analyze.text` and importable without torch; scoring text with models is in `analyze.common`.
"""

from .text import (
    REFLECTION_KEYWORDS,
    Segment,
    count_keywords,
    count_steps,
    describe,
    segments,
    trace_features,
    word_count,
)

__all__ = [
    "REFLECTION_KEYWORDS", "Segment", "count_keywords", "count_steps", "describe", "segments",
    "trace_features", "word_count",
]  # fmt: skip
