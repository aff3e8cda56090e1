"""Pure text functions shared by the analysis stages (and by anyone else who needs them).

* `segments(text, unit)`: a reasoning text cut into steps with their character spans: `lines` (a
  testbed trace writes one step per line) or `sentences` (lines further cut after `.`, `!` or `?`
  followed by white space: the unit of real traces, which write paragraphs). Provenance scores these
  spans; trace statistics count them.
* `count_keywords(text, phrases)`: reflection phrases ("wait", "let me check") counted
  case-insensitively on word boundaries.
* `trace_features(completion)`: words, reasoning lines and sentences, keyword counts of one
  completion;
* `describe(values)`: mean / median / p90 of a list of numbers.

Nothing here imports torch or transformers.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from itertools import pairwise
from typing import Literal

import numpy as np

from ..verify.reasoning import split_reasoning

Unit = Literal["lines", "sentences"]
UNITS: tuple[str, ...] = ("lines", "sentences")

# Phrases by which a reasoning trace reflects on itself (Qwen/DeepSeek-style "aha" markers).
# Matched case-insensitively, on word boundaries; spaces and hyphens inside a phrase match any run
# of white space or hyphens ("double-check" also counts "double check").
REFLECTION_KEYWORDS: tuple[str, ...] = (
    "wait",
    "hmm",
    "let me check",
    "let me verify",
    "let me re-check",
    "double-check",
    "verify",
    "alternatively",
    "on second thought",
    "actually",
    "i made a mistake",
)

# A sentence ends at ., ! or ? (possibly several, possibly followed by closing quotes or brackets)
# when white space follows: "3.5" and "e.g.," stay whole, "so 12. Then" is cut after "12.".
_SENTENCE_END = re.compile(r"[.!?]+[\"'\u201d\u2019)\]]*(?=\s)")


@dataclass(frozen=True)
class Segment:
    """One step of a text: `text == source[start:end]`, without surrounding white space."""

    start: int
    end: int
    text: str


def segments(text: str, unit: Unit = "sentences") -> list[Segment]:
    """The non-empty steps of `text`: its lines, or the sentences of its lines.

    A line break always ends a step, so `sentences` refines `lines`. Spans index into `text`.
    """
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {', '.join(UNITS)}, got {unit!r}")
    found: list[Segment] = []
    for line in re.finditer(r"[^\n]+", text):
        bounds = [line.start(), line.end()]
        if unit == "sentences":
            cuts = [line.start() + m.end() for m in _SENTENCE_END.finditer(line.group())]
            bounds = [line.start(), *cuts, line.end()]
        for start, end in pairwise(bounds):
            piece = text[start:end]
            first = start + len(piece) - len(piece.lstrip())
            last = start + len(piece.rstrip())
            if last > first:
                found.append(Segment(first, last, text[first:last]))
    return found


def count_steps(text: str | None, unit: Unit = "lines") -> int:
    """The number of non-empty lines (or sentences) of a text; 0 for None."""
    return len(segments(text, unit)) if text else 0


def word_count(text: str | None) -> int:
    """Runs of non-white-space characters."""
    return len(re.findall(r"\S+", text)) if text else 0


@lru_cache(maxsize=512)
def keyword_pattern(phrase: str) -> re.Pattern:
    """A phrase as a case-insensitive pattern on word boundaries ("wait" does not match "await" or
    "waiting"); spaces and hyphens inside the phrase match any run of white space or hyphens."""
    words = [w for w in re.split(r"[\s\-]+", phrase.strip()) if w]
    if not words:
        raise ValueError(f"empty keyword {phrase!r}")
    body = r"[\s\-]+".join(re.escape(w) for w in words)
    return re.compile(rf"(?<!\w){body}(?!\w)", re.IGNORECASE)


def count_keywords(text: str | None, phrases: Iterable[str] = REFLECTION_KEYWORDS) -> dict[str, int]:
    """Occurrences of each phrase in `text` (non-overlapping, each phrase counted on its own:
    "let me verify" counts for "let me verify" and for "verify")."""
    return {p: len(keyword_pattern(p).findall(text)) if text else 0 for p in phrases}


def trace_features(completion: str, keywords: Iterable[str] = REFLECTION_KEYWORDS) -> dict:
    """Words (the <think> tags left out), lines and sentences of the reasoning block, and the count
    of each keyword in the whole completion."""
    split = split_reasoning(completion)
    return {
        "words": word_count(split.reasoning) + word_count(split.final),
        "lines": count_steps(split.reasoning, "lines"),
        "sentences": count_steps(split.reasoning, "sentences"),
        "keywords": count_keywords(completion, keywords),
    }


def describe(values: Sequence[float]) -> dict[str, float | None]:
    """Mean, median and 90th percentile (linear interpolation); None for an empty list."""
    if not values:
        return {"mean": None, "median": None, "p90": None}
    array = np.asarray(values, dtype=float)
    return {
        "mean": float(array.mean()),
        "median": float(np.median(array)),
        "p90": float(np.percentile(array, 90)),
    }
