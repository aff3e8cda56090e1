"""Split a completion into its reasoning block and its final answer text.

Reasoning models write `<think> … </think>` and then the answer. Some chat templates put the opening
`<think>` into the prompt, so a completion may hold only the closing tag. A completion that opens a
reasoning block and never closes it was cut off: it has no final answer.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..chat import THINK_CLOSE, THINK_OPEN


@dataclass(frozen=True)
class SplitCompletion:
    reasoning: str | None  # None when the completion has no reasoning block
    final: str
    closed: bool  # False when a reasoning block was opened and never closed


def split_reasoning(completion: str) -> SplitCompletion:
    if THINK_CLOSE in completion:
        reasoning, final = completion.split(THINK_CLOSE, 1)
        reasoning = reasoning.split(THINK_OPEN, 1)[-1]
        return SplitCompletion(reasoning=reasoning.strip(), final=final.strip(), closed=True)
    if THINK_OPEN in completion:
        return SplitCompletion(reasoning=completion.split(THINK_OPEN, 1)[1].strip(), final="", closed=False)
    return SplitCompletion(reasoning=None, final=completion.strip(), closed=True)


def format_completion(reasoning: str | None, final: str) -> str:
    """The inverse of `split_reasoning`: the completion text a model is trained to produce."""
    if reasoning is None:
        return final
    return f"{THINK_OPEN}\n{reasoning}\n{THINK_CLOSE}\n{final}"
