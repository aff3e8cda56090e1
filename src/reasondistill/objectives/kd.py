"""Token-level knowledge distillation: a divergence between teacher and student at every completion token.

The teacher is an online model (`train.teacher`), run on the same token ids, or the offline top-k
store written by `generate --logprobs` / `score` (`train.teacher_logprobs`), which the divergences
see as k tokens plus a tail bin. Both at `temperature`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import PrivateAttr

from .base import Objective, ObjectiveInputs, register, summed_over_ranks
from .divergences import (
    adaptive_kl,
    generalized_jsd,
    kl_student_teacher,
    kl_teacher_student,
    shared_support,
    skew_kl_student_mixture,
    skew_kl_teacher_mixture,
    total_variation,
)
from .heads import sum_token_chunks
from .options import (
    AdaptiveKLOptions,
    ForwardKLOptions,
    JSDOptions,
    ReverseKLOptions,
    SkewForwardKLOptions,
    SkewReverseKLOptions,
    TAIDOptions,
    TokenDistillationOptions,
    TotalVariationOptions,
)


class TokenDistillation(TokenDistillationOptions, Objective):
    """Base of the token-level divergences: the per-token loss is `divergence` at `temperature` over
    `shared_support`, plus sft_weight·NLL of the label."""

    def divergence(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, inputs: ObjectiveInputs) -> torch.Tensor:
        def per_token(logits, teacher, labels):
            loss = self.divergence(*shared_support(logits, teacher, self.temperature))
            if self.sft_weight:
                loss = loss + self.sft_weight * F.cross_entropy(logits, labels, reduction="none")
            return loss

        rows = {"teacher": inputs.teacher, "labels": inputs.labels}
        return sum_token_chunks(per_token, inputs.student, rows, inputs.chunk_size, inputs.normaliser)


@register
class ForwardKL(ForwardKLOptions, TokenDistillation):
    def divergence(self, student, teacher):
        return kl_teacher_student(student, teacher)


@register
class ReverseKL(ReverseKLOptions, TokenDistillation):
    def divergence(self, student, teacher):
        return kl_student_teacher(student, teacher)


@register
class GeneralizedJSD(JSDOptions, TokenDistillation):
    def divergence(self, student, teacher):
        return generalized_jsd(student, teacher, self.beta)


@register
class SkewForwardKL(SkewForwardKLOptions, TokenDistillation):
    def divergence(self, student, teacher):
        return skew_kl_teacher_mixture(student, teacher, self.skew)


@register
class SkewReverseKL(SkewReverseKLOptions, TokenDistillation):
    def divergence(self, student, teacher):
        return skew_kl_student_mixture(student, teacher, self.skew)


@register
class TotalVariation(TotalVariationOptions, TokenDistillation):
    def divergence(self, student, teacher):
        return total_variation(student, teacher)


@register
class AdaptiveKL(AdaptiveKLOptions, TokenDistillation):
    def divergence(self, student, teacher):
        return adaptive_kl(student, teacher, self.head_mass)


def taid_target(student: torch.Tensor, teacher: torch.Tensor, t: float) -> torch.Tensor:
    """TAID's intermediate target: log softmax((1−t)·sg[log p_S] + t·log p_T).

    Interpolating log-probabilities equals interpolating logits (they differ by a constant per
    position, which softmax removes); the student part is detached, so it moves the target only.
    """
    return torch.log_softmax((1 - t) * student.detach() + t * teacher, dim=-1)


@register
class TAID(TAIDOptions, TokenDistillation):
    _t: float | None = PrivateAttr(None)
    _state: dict = PrivateAttr(
        default_factory=lambda: {"step": None, "loss": 0.0, "previous": None, "m": 0.0}
    )

    def divergence(self, student, teacher):
        return kl_teacher_student(student, taid_target(student, teacher, self.t))

    @property
    def t(self) -> float:
        return self.t_start if self._t is None else self._t

    def update_t(self, loss: float, progress: float) -> None:
        """After an optimizer step with loss L: m ← β·m + (1−β)·(L_prev − L)/L_prev;
        t ← min(t_end, max(t_linear(progress), t + α·σ(m)·(1 − t)))."""
        state = self._state
        linear = self.t_start + (self.t_end - self.t_start) * progress
        if state["previous"] is not None and self.adaptive:
            relative = (state["previous"] - loss) / (state["previous"] + 1e-15)
            state["m"] = self.momentum * state["m"] + (1 - self.momentum) * relative
            step_up = self.t + self.alpha / (1 + math.exp(-state["m"])) * (1 - self.t)
            self._t = min(self.t_end, max(linear, step_up))
        else:
            self._t = min(self.t_end, max(linear, self.t))
        state["previous"] = loss

    def __call__(self, inputs: ObjectiveInputs) -> torch.Tensor:
        # t moves once per optimizer step, with the loss summed over that step's micro-batches and
        # over the processes (each holds its share of the global batch's loss), so every rank moves t
        # alike and as one process would (the reference code moves it at every forward call,
        # validation included).
        state = self._state
        if state["step"] is not None and inputs.step != state["step"]:
            device = inputs.labels.device
            self.update_t(summed_over_ranks(state["loss"], device), inputs.progress)
            state["loss"] = 0.0
        state["step"] = inputs.step
        loss = super().__call__(inputs)
        state["loss"] += loss.item()
        return loss

    def logged_terms(self) -> dict[str, float]:
        return {**super().logged_terms(), "t": self.t}

    def state_dict(self) -> dict:
        return {"t": self._t, **self._state}

    def load_state_dict(self, state: dict) -> None:
        self._t = state["t"]
        self._state = {key: state[key] for key in ("step", "loss", "previous", "m")}
