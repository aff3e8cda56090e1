"""Asking a teacher to label the chunks of a trace's reasoning (the `chunk` stage's `labeller:
teacher`): the prompt, with the chunks numbered, and reading one label per chunk from the reply."""

from __future__ import annotations

import re
from collections.abc import Sequence

from ..records import Message
from ..verify.reasoning import split_reasoning
from .chunking import ChunkLabel

LABEL_SYSTEM_PROMPT = """\
You label the chunks of a reasoning trace that solves a problem.

A chunk is "reasoning" when it moves the solution forward: it computes, derives, infers or decides
something. A chunk is "non-reasoning" when it only restates the problem, announces what comes next
or comments on the process (transitions such as "let me", "okay, so", "first, I need to
understand"), or repeats earlier content without any new computation.

Reply with one line per chunk, in order, exactly "<number>: reasoning" or "<number>: non-reasoning",
and nothing else."""

_LABEL_LINE = re.compile(
    r"^\W*(\d+)\s*[\]:.)\-–]*\s*\**\s*(non[- ]?reasoning|reasoning)\b", re.IGNORECASE | re.MULTILINE
)


def label_messages(question: str, chunks: Sequence[str], system_prompt: str | None = None) -> list[Message]:
    numbered = "\n".join(f"[{i}] {chunk.strip()}" for i, chunk in enumerate(chunks, start=1))
    user = f"Problem:\n{question}\n\nChunks of the reasoning ({len(chunks)}):\n{numbered}"
    system = LABEL_SYSTEM_PROMPT if system_prompt is None else system_prompt
    return ([Message(role="system", content=system)] if system else []) + [Message(role="user", content=user)]


def parse_labels(reply: str, count: int) -> list[ChunkLabel] | None:
    """One label per chunk from a teacher's reply (its own `<think>` block left out), or None when
    a chunk has no label, two different ones, or a number out of range appears."""
    split = split_reasoning(reply)
    if not split.closed:
        return None
    found: dict[int, ChunkLabel] = {}
    for match in _LABEL_LINE.finditer(split.final):
        number = int(match.group(1))
        label: ChunkLabel = "reasoning" if match.group(2).lower() == "reasoning" else "non-reasoning"
        if not 1 <= number <= count or found.get(number, label) != label:
            return None
        found[number] = label
    if len(found) != count:
        return None
    return [found[i] for i in range(1, count + 1)]
