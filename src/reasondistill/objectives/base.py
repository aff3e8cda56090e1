"""What every objective computes on: the micro-batch it sees (`ObjectiveInputs`) and the interface the
trainer calls (`Objective`).

One convention for all: per-token terms are summed over completion tokens and divided by
`normaliser`, the number of completion tokens in the *global* batch (all gradient-accumulation steps
and processes), so the gradient does not depend on how a batch is split into micro-batches. Pair
objectives (DPO, REDI, ...) sum per-pair terms and divide by the number of pairs in the global batch.

No torch at import time (the types below are annotations only): data code reads IGNORE_INDEX, and
the objectives' options (options.py) stay importable without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from pydantic import PrivateAttr

from .options import ObjectiveOptions

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

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


class Objective(ObjectiveOptions):
    """An objective that computes its loss: a subclass of its options model (so `self.beta` is an
    option) with the hooks the trainer calls. Made from a spec by `build_objective`."""

    # the terms of the loss noted since the last log line: name → (sum over calls, optimizer steps seen)
    _terms: dict = PrivateAttr(default_factory=dict)
    _term_steps: set = PrivateAttr(default_factory=set)

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

    def note_terms(self, step: int, **terms) -> None:
        """Note parts of this call's loss (floats or 0-d tensors, on the loss's scale) for the training
        log: each is summed over a step's micro-batches, as the loss is, and averaged over steps."""
        self._term_steps.add(step)
        for name, value in terms.items():
            self._terms[name] = self._terms.get(name, 0.0) + float(value)

    def logged_terms(self) -> dict[str, float]:
        """The noted terms per optimizer step since the last call (then forgotten), by name; objectives
        with state add it (TAID's t)."""
        steps = max(1, len(self._term_steps))
        terms = {name: total / steps for name, total in self._terms.items()}
        self._terms.clear()
        self._term_steps.clear()
        return terms

    def state_dict(self) -> dict:
        """What the objective carries from one step to the next (TAID's t), as JSON: saved with every
        checkpoint and restored on resume. Stateless objectives carry nothing."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned."""
        if state:
            raise ValueError(f"objective {self.name!r} keeps no state, got {sorted(state)}")


def summed_over_ranks(value: float, device: torch.device) -> float:
    """`value` summed over the processes of a distributed run (itself on one process). Every process
    must call it at the same point: it is a collective."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    total = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return float(total.item())


# name → the Objective subclass that computes it; filled by @register as the loss modules load
IMPLEMENTATIONS: dict[str, type[Objective]] = {}


def register(cls: type[Objective]) -> type[Objective]:
    """Class decorator: `cls` computes the objective its options model names."""
    IMPLEMENTATIONS[cls.registered_name()] = cls
    return cls


def sum_over_tokens(per_token: torch.Tensor, inputs: ObjectiveInputs) -> torch.Tensor:
    """Σ over the micro-batch's completion tokens / completion tokens in the global batch."""
    return per_token.sum() / inputs.normaliser
