"""Analysis stages: where a distilled model's sentences come from (`provenance`), how much of its
training data it reproduces verbatim (`memorization`), and what traces look like (`trace_stats`).

Each writes analysis/<name>.json and offers `report_sections(run)` for the report. The pure text
functions (segmentation into steps, reflection keywords, length statistics) are in `analyze.text`
and importable without torch.
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
