"""Training objectives by name; a recipe's `train.objective` picks one, `train.objective_args` sets it.

The formulas are small pure functions (`divergences`, and one module per family: `kd`, `selective`,
`sequence`, `preference`, `self_distill`); a registered objective is a
pydantic model of its options (validated, with help text) whose `__call__` maps those functions
over the completion positions of a batch and reduces them. One convention for all: per-token terms
are summed over completion tokens and divided by `normaliser`, the number of completion tokens in
the *global* batch (all gradient-accumulation steps and processes), so the gradient does not depend
on how a batch is split into micro-batches. Pair objectives (DPO, REDI, ...) sum per-pair terms and
divide by the number of pairs in the global batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from transformers import PreTrainedTokenizerBase

from ..errors import UserError
from .heads import Head, SparseTargets

IGNORE_INDEX = -100  # label value of prompt and padding positions


@dataclass
class ObjectiveInputs:
    """One micro-batch, reduced to its completion positions (N of them, across all sequences)."""

    student: Head  # final hidden states + output projection of the student at the N positions
    labels: torch.Tensor  # [N] the token each position predicts
    normaliser: torch.Tensor | int  # completion tokens (pairs for pair objectives) in the global batch
    sequence: torch.Tensor  # [N] index of the sequence (batch row) each position belongs to
    num_sequences: int
    teacher: Head | SparseTargets | None = None
    reference: Head | None = None  # a frozen model: AdaSPEC's reference, DPO's reference policy
    rewards: torch.Tensor | None = None  # [num_sequences] verifier reward of each on-policy sample
    groups: torch.Tensor | None = None  # [num_sequences] which prompt each sample answers (GRPO groups)
    progress: float = 0.0  # fraction of training done, for schedules
    step: int = 0  # optimizer step
    chunk_size: int = 512  # positions per chunk of [chunk, vocab] logits


class Objective(BaseModel):
    """Base of registered objectives: the model fields are the objective's options."""

    model_config = ConfigDict(extra="forbid")

    name: ClassVar[str]
    needs_teacher: ClassVar[bool] = False
    needs_reference: ClassVar[bool] = False
    # DPO's reference is conventionally the policy it starts from; others need one named explicitly
    reference_defaults_to_init: ClassVar[bool] = False
    data: ClassVar[Literal["completions", "pairs"]] = "completions"
    # policy-gradient objectives estimate E_{y~q_θ}[·] from samples of the current weights only
    on_policy_only: ClassVar[bool] = False
    needs_rewards: ClassVar[bool] = False  # verifier rewards of groups of samples (GRPO)

    def setup(self, tokenizer: PreTrainedTokenizerBase) -> None:
        """Called once with the student's tokenizer before training (special token ids, separators)."""

    def select_labels(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Labels [B, S] the loss is computed on, chosen per batch by the collator (before tokens are
        counted for the normaliser); identity except for objectives that train on parts of a completion."""
        return labels

    def corrupt_inputs(self, input_ids: torch.Tensor, labels: torch.Tensor, progress: float) -> torch.Tensor:
        """Input ids [B, S] the student reads (labels unchanged); identity except for input-noising objectives."""
        return input_ids

    def __call__(self, inputs: ObjectiveInputs) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def summary(cls) -> str:
        return (cls.__doc__ or "").strip().splitlines()[0]


OBJECTIVES: dict[str, type[Objective]] = {}


def register(name: str):
    def add(cls: type[Objective]) -> type[Objective]:
        cls.name = name
        OBJECTIVES[name] = cls
        return cls

    return add


def make_objective(name: str, options: dict | None = None) -> Objective:
    """The objective `name` with `options`, or a one-line error naming the unknown name or bad option."""
    try:
        cls = OBJECTIVES[name]
    except KeyError:
        raise UserError(f"unknown objective {name!r}; known objectives: {', '.join(OBJECTIVES)}") from None
    try:
        return cls(**(options or {}))
    except ValidationError as err:
        problem = err.errors()[0]
        field = ".".join(str(part) for part in problem["loc"])
        where = f"objective_args.{field}" if field else "objective_args"
        raise UserError(f"objective {name}: {where}: {problem['msg']}") from None


def sum_over_tokens(per_token: torch.Tensor, inputs: ObjectiveInputs) -> torch.Tensor:
    """Σ over the micro-batch's completion tokens / completion tokens in the global batch."""
    return per_token.sum() / inputs.normaliser


from . import kd, policy, preference, selective, self_distill, sequence  # noqa: E402,F401  (register the objectives)
