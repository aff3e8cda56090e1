"""Cutting a trace's reasoning into chunks, and the Skip-Thinking cut that leaves out the
non-reasoning middle ones.

Skip-Thinking (EMNLP 2025, arXiv 2505.18642) trains on chunks of the teacher's rationale (CWT) and
on "skipped" sequences that leave out the non-reasoning middle chunks (STT). Its chunkers, coherence
metric and non-reasoning classifier were not published; what is here is a deterministic stand-in.

Chunking (of the reasoning block only; the final answer text is never cut). Chunks are substrings
that re-join to the reasoning exactly (whitespace included: a chunk carries the whitespace after it).

- `average` (the paper's AC): `chunks` pieces of near-equal length in whitespace-separated words
  (sizes differ by at most one word, longer pieces first).
- `boundary` (a stand-in for search-based chunking, SBC): cut at the strongest boundary the text
  has: paragraphs (blank lines); a text without paragraph breaks at its line breaks; a single line
  at sentence ends (`.`, `!`, `?` followed by whitespace). A piece longer than `max_words` is cut
  again at the next weaker boundary, and a sentence still longer into `max_words`-word pieces.
  Consecutive pieces shorter than `min_words` are then joined with the next (within `max_words`).
  Units of text the author separated stay whole, so a "Wait, let me check." paragraph is a chunk
  of its own, where SBC would search for split points of greatest coherence.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal

ChunkLabel = Literal["reasoning", "non-reasoning"]

_WORD_SPAN = re.compile(r"\S+\s*")
# Boundaries from strongest to weakest; each piece ends right after its boundary's whitespace.
_BOUNDARIES = (
    re.compile(r"\n[ \t]*\n\s*"),  # paragraphs
    re.compile(r"\n\s*"),  # lines
    re.compile(r"(?<=[.!?])[\"')\]]*\s+"),  # sentences
)


def count_words(text: str) -> int:
    return len(text.split())


def _cut(text: str, ends: Sequence[int]) -> list[str]:
    """`text` cut at the given end offsets (the last piece runs to the end of the text)."""
    pieces, start = [], 0
    for end in ends:
        if start < end < len(text):
            pieces.append(text[start:end])
            start = end
    pieces.append(text[start:])
    return pieces


def _word_ends(text: str) -> list[int]:
    return [m.end() for m in _WORD_SPAN.finditer(text)]


def average_chunks(text: str, chunks: int) -> list[str]:
    """`chunks` pieces with near-equal word counts (AC); fewer when the text has fewer words."""
    ends = _word_ends(text)
    if not ends:
        return [text] if text else []
    count = min(chunks, len(ends))
    size, extra = divmod(len(ends), count)
    cuts, taken = [], 0
    for i in range(count - 1):
        taken += size + (i < extra)
        cuts.append(ends[taken - 1])
    return _cut(text, cuts)


def _word_groups(text: str, max_words: int) -> list[str]:
    ends = _word_ends(text)
    return _cut(text, ends[max_words - 1 :: max_words])


def _segments(text: str, max_words: int, level: int = 0) -> list[str]:
    if level == len(_BOUNDARIES):
        return _word_groups(text, max_words)
    pieces = _cut(text, [m.end() for m in _BOUNDARIES[level].finditer(text)])
    if len(pieces) == 1:  # no boundary of this strength: look for the next weaker one
        return _segments(text, max_words, level + 1)
    segments = []
    for piece in pieces:
        if count_words(piece) <= max_words:
            segments.append(piece)
        else:
            segments.extend(_segments(piece, max_words, level + 1))
    return segments


def boundary_chunks(text: str, max_words: int = 64, min_words: int = 1) -> list[str]:
    """Chunks at paragraph / line / sentence boundaries of at most `max_words` words (see the module
    docstring); pieces under `min_words` words join the next one while the chunk stays within the maximum."""
    if not text:
        return []
    chunks: list[str] = []
    current, words = "", 0
    for segment in _segments(text, max_words):
        size = count_words(segment)
        if current and (words >= min_words and size > 0 or words + size > max_words):
            chunks.append(current)
            current, words = "", 0
        current, words = current + segment, words + size
    if current:
        if chunks and words < min_words and count_words(chunks[-1]) + words <= max_words:
            chunks[-1] += current
        else:
            chunks.append(current)
    return chunks


def skip_thinking(chunks: Sequence[str], labels: Sequence[ChunkLabel]) -> tuple[list[str], list[int]]:
    """STT: the chunks without the non-reasoning ones between the first and the last; returns the
    kept chunks and the indices of the removed ones."""
    removed = [i for i in range(1, len(chunks) - 1) if labels[i] == "non-reasoning"]
    return [c for i, c in enumerate(chunks) if i not in removed], removed
