"""The texts an analysis reads: which set of the run (`TextSelection`, options shared by the analysis
stages), and one completion of it (`Text`). `store.load_texts` reads the selected set.

Light: pydantic and the record types only.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Literal

from pydantic import Field, model_validator

from ..config import StageConfig
from ..errors import UserError
from ..records import GradedTrace, Message, TrainingExample


class TextSelection(StageConfig):
    """One of: a graded set, a curated set (or file), or a model's evaluation completions."""

    traces: str | None = Field(None, description="a graded set of the run (graded/<name>), with labels")
    data: str | None = Field(
        None,
        description="a curated set of the run (curated/<name>) or a .jsonl/.parquet file of training "
        "examples (no labels)",
    )
    eval_model: str | None = Field(
        None,
        description="the evaluation completions of a model (eval/<eval_model>/<task>.<decoding>.parquet, "
        "with labels; the model's name in the run, e.g. `student` or `teacher`)",
    )
    decoding: Literal["greedy", "sampled"] = Field(
        "greedy", description="with eval_model: which evaluation completions"
    )
    tasks: list[str] | None = Field(None, description="only these tasks (default: all)")
    limit: int | None = Field(None, ge=1, description="at most this many texts per task (in file order)")

    @model_validator(mode="after")
    def _one_source(self) -> TextSelection:
        if sum(x is not None for x in (self.traces, self.data, self.eval_model)) > 1:
            raise ValueError("set one of traces (a graded set), data (a curated set) or eval_model")
        return self


@dataclass
class Text:
    problem_id: str
    task: str
    sample_idx: int | None
    completion: str
    label: str | None  # None for training examples, which carry no grade
    completion_tokens: int | None  # as the generator counted them (graded and evaluation sets)
    messages: list[Message] | None  # the prompt; None until joined with the run's problems

    @classmethod
    def from_graded(cls, trace: GradedTrace) -> Text:
        """A graded trace or evaluation completion: labelled and counted, its prompt left to join."""
        return cls(
            trace.problem_id, trace.task, trace.sample_idx, trace.completion, trace.label,
            trace.completion_tokens, None,
        )  # fmt: skip

    @classmethod
    def from_example(cls, example: TrainingExample) -> Text:
        """A training example: its prompt included, no label, no token count."""
        return cls(
            example.problem_id, example.task, example.sample_idx, example.completion, None, None,
            list(example.messages),
        )  # fmt: skip


def only_tasks(items: list, tasks: list[str] | None, limit: int | None, where: str) -> list:
    """The items (anything with a `.task`) of `tasks`, at most `limit` per task in order; an error
    naming `where` for a task with no items, or when nothing is left."""
    if tasks is not None:
        missing = sorted(set(tasks) - {item.task for item in items})
        if missing:
            raise UserError(f"{where}: no texts of task {missing[0]!r}")
        items = [item for item in items if item.task in tasks]
    if limit is not None:
        seen: Counter = Counter()
        limited = []
        for item in items:
            seen[item.task] += 1
            if seen[item.task] <= limit:
                limited.append(item)
        items = limited
    if not items:
        raise UserError(f"{where} holds no texts to analyse")
    return items


def selection_source(sel: TextSelection, default_eval_model: str | None = None) -> tuple[str, str]:
    """(kind, name) of the selected texts: ("graded" | "curated" | "eval", name)."""
    if sel.traces is not None:
        return "graded", sel.traces
    if sel.data is not None:
        return "curated", sel.data
    if sel.eval_model is not None or default_eval_model is not None:
        return "eval", sel.eval_model or default_eval_model
    raise UserError("no texts selected: set traces (a graded set), data (a curated set) or eval_model")
