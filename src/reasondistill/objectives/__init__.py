"""Training objectives by name; a recipe's `train.objective` picks one.

An objective is a small pure function of `ObjectiveInputs` returning a scalar loss. Convention for
all of them: the per-token loss is summed over completion tokens and divided by `normaliser`, the
number of completion tokens in the *global* batch (all gradient-accumulation steps and processes),
so the gradient does not depend on how a batch is split into micro-batches.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import UserError

IGNORE_INDEX = -100  # label value of prompt and padding positions


@dataclass
class ObjectiveInputs:
    student_logits: torch.Tensor  # [batch, seq, vocab], position t predicts token t+1
    labels: torch.Tensor  # [batch, seq], IGNORE_INDEX outside the completion
    normaliser: torch.Tensor | int  # completion tokens in the global batch


Objective = Callable[[ObjectiveInputs], torch.Tensor]


@dataclass(frozen=True)
class ObjectiveSpec:
    name: str
    fn: Objective
    needs_teacher: bool
    summary: str


OBJECTIVES: dict[str, ObjectiveSpec] = {}


def register(name: str, *, needs_teacher: bool = False) -> Callable[[Objective], Objective]:
    def add(fn: Objective) -> Objective:
        summary = (fn.__doc__ or "").strip().splitlines()[0]
        OBJECTIVES[name] = ObjectiveSpec(name=name, fn=fn, needs_teacher=needs_teacher, summary=summary)
        return fn

    return add


def get_objective(name: str) -> ObjectiveSpec:
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise UserError(f"unknown objective {name!r}; known objectives: {', '.join(OBJECTIVES)}") from None


@register("sft")
def completion_nll(inputs: ObjectiveInputs) -> torch.Tensor:
    """SFT: negative log-likelihood of the completion tokens under the student.

    loss = −Σ_t m_t · log p_S(y_t | x, y_<t) / N, with m_t = 1 on completion tokens and N the number
    of completion tokens in the global batch.
    """
    logits = inputs.student_logits[:, :-1].flatten(0, 1).float()
    targets = inputs.labels[:, 1:].flatten()
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum") / inputs.normaliser
