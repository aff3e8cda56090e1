"""Labelling the chunks of a trace's reasoning with rules: reasoning or non-reasoning (the `chunk`
stage's `labeller: rules`, and its fallback when a teacher's labels cannot be read).

Per chunk, the first rule that applies; `content words` are the chunk's words without stop words and
numbers, `new` means absent from the question and from the earlier chunks:

1. `empty`: no word at all → non-reasoning.
2. `computation`: an equation, comparison or operation between numbers (`5 + 8 = 13`, `x > 2`,
   `\\frac`) or a number that is new → reasoning.
3. `meta`: opens with a transition or meta phrase ("okay", "wait", "first", "let me", "I need to",
   "the problem asks", "in summary", …) or has no content word, and has no inference word outside
   the meta phrases → non-reasoning.
4. `inference`: an inference word (therefore, thus, hence, so, because, since, if, then, implies,
   means, follows, must, conclude, consequently) → reasoning.
5. `restatement`: at least `restate_overlap` (0.7) of its content words occur in the question →
   non-reasoning.
6. `summary`: at least `summary_overlap` (0.8) of its content words occur in the question or the
   earlier chunks (it repeats earlier content and computes nothing new) → non-reasoning.
7. `default`: reasoning (when unsure, keep it).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from .chunking import ChunkLabel

# Words that say nothing about the content of a chunk (not counted as its content words).
_STOP_WORDS = frozenset(
    (  # noqa: SIM905 (a list literal of 114 words takes 114 lines)
        "a an the of to in on at for and or but not no "
        "is are was were be been being am "
        "it its this that these those there here "
        "i we you he she they me us my our your his her their them "
        "with as by from "
        "do does did doing has have had having will would can could should shall may might "
        "just also what which who whom how when where why all any each some one more most other such only own same "
        "than too very s t about into over under again further once up down out off then so if now "
        "let lets let's okay ok well yes"
    ).split()
)
_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_EXPRESSION = re.compile(
    r"[^\s=<>≤≥≠]*\s*[=<>≤≥≠]\s*[^\s=<>≤≥≠]+"  # an equation or comparison with its two sides
    r"|\d[\d.,]*\s*[-+*/×÷^]\s*[\d(][\d.,]*"  # an operation between numbers
    r"|\\(?:frac|sqrt|cdot|times|div|sum|prod|int)\b"  # LaTeX maths
)
_OPENER = re.compile(
    r"^\W*(?:okay|ok|alright|all right|hmm+|um+|uh+|wait|well|oh|now|first(?:ly)?|next|alternatively|"
    r"actually|so,|so (?:let me|let's|i|we|the (?:problem|question))|let me|let's|i need to|i have to|"
    r"i should|i'll|i will|i want to|i think|i guess|we need to|we have to|"
    r"the (?:problem|question|task) (?:is asking|asks|says|states|wants|gives)|"
    r"in summary|to summarize|to sum up|to recap)\b",
    re.IGNORECASE,
)
_META_PHRASES = re.compile(
    r"\b(?:okay,? so|so,? let me|so,? let's|let me|let's|i need to|i have to|i should|i think|i'll|i will|"
    r"i want to|we need to|(?:check|see|verify|wonder|determine)(?:ing)? (?:if|whether)|"
    r"the (?:problem|question|task) (?:is asking|asks|says|states|wants|gives)|in summary|to summarize|"
    r"to sum up|to recap)\b",
    re.IGNORECASE,
)
_INFERENCE = re.compile(
    r"\b(?:therefore|thus|hence|so|because|since|if|then|implies|implied|implying|means|meaning|"
    r"follows|must|conclude|concludes|consequently)\b",
    re.IGNORECASE,
)


def _content_words(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if w not in _STOP_WORDS}


def _expressions(text: str) -> set[str]:
    return {re.sub(r"\s+", "", e).strip(".,;:!?") for e in _EXPRESSION.findall(text)}


@dataclass(frozen=True)
class RuleLabeller:
    """The rules of the module docstring; `label(chunks, question)` → (labels, rules)."""

    restate_overlap: float = 0.7
    summary_overlap: float = 0.8

    def label(self, chunks: Sequence[str], question: str) -> tuple[list[ChunkLabel], list[str]]:
        seen_words = _content_words(question)
        seen_numbers = set(_NUMBER.findall(question))
        seen_expressions = _expressions(question)
        question_words = set(seen_words)
        labels, rules = [], []
        for i, chunk in enumerate(chunks):
            words = _content_words(chunk)
            numbers, expressions = set(_NUMBER.findall(chunk)), _expressions(chunk)
            label, rule = self._rule(chunk, words, numbers - seen_numbers, expressions - seen_expressions,
                                     question_words, seen_words, earlier=i > 0)  # fmt: skip
            labels.append(label)
            rules.append(rule)
            seen_words |= words
            seen_numbers |= numbers
            seen_expressions |= expressions
        return labels, rules

    def _rule(self, chunk, words, new_numbers, new_expressions, question_words, seen_words, earlier):
        if not re.search(r"\w", chunk):
            return "non-reasoning", "empty"
        if new_expressions or new_numbers:
            return "reasoning", "computation"
        without_meta = _OPENER.sub(" ", _META_PHRASES.sub(" ", chunk))
        if (_OPENER.match(chunk) or not words) and not _INFERENCE.search(without_meta):
            return "non-reasoning", "meta"
        if _INFERENCE.search(chunk):
            return "reasoning", "inference"
        if len(words & question_words) >= self.restate_overlap * len(words):
            return "non-reasoning", "restatement"
        if earlier and len(words & seen_words) >= self.summary_overlap * len(words):
            return "non-reasoning", "summary"
        return "reasoning", "default"
