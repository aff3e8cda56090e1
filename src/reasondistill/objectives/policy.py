"""Policy-gradient objectives on the student's own samples (train with `on_policy`, fraction 1).

With y ~ q_θ sampled from the current weights, per completion token t:

    ℓ_t = log q_θ(y_t | c_t)          the student's log-probability of the token it sampled
    d_t = ℓ_t − log p_T(y_t | c_t)    the sampled reverse-KL estimate: E_y[Σ_t d_t] = KL(q_θ ‖ p_T)

Samples are drawn once per optimizer step and used for that step only, so the sampling policy is
the current one (π_old = π_θ): PPO/GRPO's importance ratio exp(ℓ_t − sg[ℓ_t]) is 1 with gradient
∇ℓ_t, and its clip never binds. Log-probabilities are at temperature 1; sample at temperature 1
(the default) for an unbiased estimate.
"""

from __future__ import annotations

import math

import torch

from .base import Objective, ObjectiveInputs, register, sum_over_tokens
from .heads import SparseTargets, map_token_chunks, sum_token_chunks
from .options import GRPOOptions, KDRLOptions, ReverseKLPolicyGradientOptions


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[label] per position: [n]."""
    return torch.log_softmax(logits, dim=-1).gather(-1, labels[:, None])[:, 0]


def teacher_token_logprobs(teacher: torch.Tensor | SparseTargets, labels: torch.Tensor) -> torch.Tensor:
    """The teacher's log p_T(label) per position, from its logits or its stored/served distribution."""
    if isinstance(teacher, torch.Tensor):
        return token_logprobs(teacher, labels)
    if teacher.token_logprob is None:
        raise ValueError(
            "policy-gradient objectives need the teacher's log-probability of each sampled token"
        )
    return teacher.token_logprob


def sampled_reverse_kl(student: torch.Tensor, teacher: torch.Tensor, estimator: str) -> torch.Tensor:
    """KL(q_θ‖p_T) estimators of one sampled token from d = log q_θ(y) − log p_T(y) (Schulman's k1/k2/k3).

    k1 = d (unbiased value; as a loss its expected gradient is 0 on-policy, so KDRL uses it as a
    reward); k2 = ½·d² (gradient d·∇log q_θ: the unbiased reverse-KL gradient); k3 = e^(−d) + d − 1
    (unbiased value, low variance; d clamped to ±10 as verl does).
    """
    d = student - teacher
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d.square()
    d = d.clamp(-10, 10)
    return torch.exp(-d) + d - 1


@register
class ReverseKLPolicyGradient(ReverseKLPolicyGradientOptions, Objective):
    """The on-policy distillation loss of Thinking Machines' tinker cookbook and ms-swift's OPD: each
    sampled token is reinforced by how much more likely the teacher finds it than the student
    (discount 0: the advantage is the token's own). The expected gradient is ∇KL(q_θ‖p_T); it needs
    only log p_T of the sampled token, so a served teacher answers with k = 1. Zero when teacher = student.
    """

    def __call__(self, inputs: ObjectiveInputs) -> torch.Tensor:
        def per_token(logits, teacher, labels):
            student = token_logprobs(logits, labels)
            advantage = (teacher_token_logprobs(teacher, labels) - student).detach()
            return -advantage * student

        rows = {"teacher": inputs.teacher, "labels": inputs.labels}
        return sum_token_chunks(per_token, inputs.student, rows, inputs.chunk_size, inputs.normaliser)


def group_advantages(rewards: torch.Tensor, groups: torch.Tensor, scale: bool) -> torch.Tensor:
    """GRPO's advantage per sample: (r − mean of its group) / (std of its group + 1e-4), or unscaled
    (Dr. GRPO) when `scale` is false. Groups whose samples all score alike get advantage 0."""
    _, group = groups.unique(return_inverse=True)
    count = torch.zeros(int(group.max()) + 1, device=rewards.device).index_add_(
        0, group, torch.ones_like(rewards)
    )
    mean = torch.zeros_like(count).index_add_(0, group, rewards) / count
    centred = rewards - mean[group]
    if not scale:
        return centred
    variance = torch.zeros_like(count).index_add_(0, group, centred.square()) / (count - 1).clamp_min(1)
    return centred / (variance.sqrt()[group] + 1e-4)


@register
class GRPO(GRPOOptions, Objective):
    def policy_loss(self, student: torch.Tensor, advantage: torch.Tensor) -> torch.Tensor:
        return -advantage * torch.exp(student - student.detach())

    def advantages(self, inputs: ObjectiveInputs) -> torch.Tensor:
        if inputs.rewards is None or inputs.groups is None:
            raise ValueError(f"{self.name} needs verifier rewards of on-policy samples")
        return group_advantages(inputs.rewards.float(), inputs.groups, self.scale_rewards)[inputs.sequence]

    def __call__(self, inputs: ObjectiveInputs) -> torch.Tensor:
        def per_token(logits, labels, advantage):
            return self.policy_loss(token_logprobs(logits, labels), advantage)

        rows = {"labels": inputs.labels, "advantage": self.advantages(inputs)}
        return sum_token_chunks(per_token, inputs.student, rows, inputs.chunk_size, inputs.normaliser)


@register
class KDRL(KDRLOptions, GRPO):
    """The teacher takes the place of GRPO's reference model in the KL term. Estimator k2 (the paper's
    best) and k3 are added to the loss; k1 is subtracted from the advantage instead (as a loss term
    its gradient vanishes on-policy). β follows `kd_schedule` from `kd_coef` to `kd_coef_end`
    (reported: 5e-3 → 1e-3). `kd_on: incorrect` applies the KL only to samples the verifier
    rejects (reward-guided KD).
    """

    def kd_weight(self, progress: float) -> float:
        if self.kd_coef_end is None:
            return self.kd_coef
        share = progress if self.kd_schedule == "linear" else (1 - math.cos(math.pi * progress)) / 2
        return self.kd_coef + (self.kd_coef_end - self.kd_coef) * share

    def __call__(self, inputs: ObjectiveInputs) -> torch.Tensor:
        beta = self.kd_weight(inputs.progress)
        kd_mask = torch.ones(inputs.num_sequences, device=inputs.labels.device)
        if self.kd_on == "incorrect":
            kd_mask = (inputs.rewards < 1).float()

        def per_token(logits, teacher, labels, advantage, kd_mask):
            student = token_logprobs(logits, labels)
            kl = sampled_reverse_kl(student, teacher_token_logprobs(teacher, labels), self.kl_estimator)
            if self.kl_estimator == "k1":
                return self.policy_loss(student, advantage - beta * kd_mask * kl.detach()), kl.detach()
            return self.policy_loss(student, advantage) + beta * kd_mask * kl, kl.detach()

        rows = {
            "teacher": inputs.teacher,
            "labels": inputs.labels,
            "advantage": self.advantages(inputs),
            "kd_mask": kd_mask[inputs.sequence],
        }
        per_token_loss, kl = map_token_chunks(per_token, inputs.student, rows, inputs.chunk_size)
        self.note_terms(inputs.step, kl=sum_over_tokens(kl, inputs))
        return sum_over_tokens(per_token_loss, inputs)
