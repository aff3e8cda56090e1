"""Self-distillation: the student's own (detached, re-tempered) distribution is the teacher.

* `curio_sft` (CurioSFT, method card 8): SFT plus a pull of each label's log-prob toward its
  log-prob under a per-token heated copy of the model, which keeps entropy from collapsing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Objective, ObjectiveInputs, register
from .divergences import entropy
from .heads import sum_token_chunks
from .options import CurioSFTOptions


def top_n_entropy(logits: torch.Tensor, tau: torch.Tensor | float, top_n: int) -> torch.Tensor:
    """H(softmax(z_top / τ)) over each row's `top_n` largest logits z_top (all of them if fewer): [n, V] → [n]."""
    if top_n < logits.shape[-1]:
        logits = logits.topk(top_n, dim=-1).values
    if isinstance(tau, torch.Tensor):
        tau = tau[:, None]
    return entropy(torch.log_softmax(logits / tau, dim=-1))


@torch.no_grad()
def adaptive_temperature(
    logits: torch.Tensor,
    tau_min: float = 1.1,
    tau_max: float = 1.5,
    top_n: int = 512,
    midpoint: float = 1.2,
    slope: float = 2.0,
    max_increase: float = 0.5,
    steps: int = 20,
    deterministic_entropy: float = 0.03,
) -> torch.Tensor:
    """CurioSFT's per-token temperature τ_t [n] of logits [n, V] (`compute_tau_from_logits`).

    H_now = entropy of softmax over the top-`top_n` logits; target H* = H_now + δ with
    δ = `max_increase`·σ(`slope`·(H_now − `midpoint`)), so uncertain tokens are heated more. τ ∈
    [τ_min, τ_max] solves H_top-n(softmax(z/τ)) = H* by `steps` bisection steps (the entropy of a
    tempered softmax rises with τ); it is τ_min where even τ_min overshoots H* and τ_max where τ_max
    falls short. Tokens whose full-vocabulary entropy is ≤ `deterministic_entropy` get τ_min.
    """
    logits = logits.float()
    logits_top = logits.topk(top_n, dim=-1).values if top_n < logits.shape[-1] else logits
    h_now = top_n_entropy(logits_top, 1.0, top_n)
    h_star = h_now + max_increase * torch.sigmoid(slope * (h_now - midpoint))
    lo = torch.full_like(h_now, tau_min)
    hi = torch.full_like(h_now, tau_max)
    tau = torch.where(
        h_star <= top_n_entropy(logits_top, lo, top_n),
        lo,
        torch.where(h_star >= top_n_entropy(logits_top, hi, top_n), hi, (lo + hi) / 2),
    )
    for _ in range(steps):
        up = top_n_entropy(logits_top, tau, top_n) < h_star
        lo = torch.where(up, tau, lo)
        hi = torch.where(up, hi, tau)
        tau = (lo + hi) / 2
    deterministic = entropy(torch.log_softmax(logits, dim=-1)) <= deterministic_entropy
    return torch.where(deterministic, torch.full_like(tau, tau_min), tau)


def curio_sft_token_loss(
    logits: torch.Tensor, labels: torch.Tensor, tau: torch.Tensor, alpha: float
) -> torch.Tensor:
    """ℓ_t = −log π_θ(y_t) + α·½·(log π_θ(y_t) − log π̃(y_t))², π̃ = softmax(sg[z]/τ_t): [n, V], [n], [n] → [n].

    The second term is a sampled-token k2 ("MSE") estimator between the student and its heated,
    detached self, not a full-vocabulary KL; with τ_t ≥ 1.1 it pulls confident labels' log-probs
    down toward the heated value while the NLL pulls them up.
    """
    logprob = -F.cross_entropy(logits, labels, reduction="none")
    heated = -F.cross_entropy(logits.detach() / tau[:, None], labels, reduction="none")
    return -logprob + alpha * 0.5 * (logprob - heated) ** 2


@register
class CurioSFT(CurioSFTOptions, Objective):
    """The self-teacher π̃ = softmax(z_ref/τ_t) uses the student's own logits, detached. In the paper
    the reference is a copy re-synced every 5 optimizer steps with mix 0.99 (π_ref ← 0.99·π_θ +
    0.01·π_ref), so it lags the student by at most a few steps; here it is the current weights.
    τ_t comes from `adaptive_temperature` on those logits (the paper computes it from the
    reference's logits). The student's log-prob is at temperature 1. Summed over completion tokens
    and divided by `normaliser` (token mean). No teacher is needed.
    """

    def temperature(self, logits: torch.Tensor) -> torch.Tensor:
        """The self-teacher's τ_t [n] for student logits [n, V] (`adaptive_temperature` with these options)."""
        return adaptive_temperature(
            logits,
            tau_min=self.tau_min,
            tau_max=self.tau_max,
            top_n=self.top_n,
            midpoint=self.entropy_midpoint,
            slope=self.entropy_slope,
            max_increase=self.max_entropy_increase,
            steps=self.bisection_steps,
            deterministic_entropy=self.deterministic_entropy,
        )

    def __call__(self, inputs: ObjectiveInputs) -> torch.Tensor:
        def per_token(logits, labels):
            return curio_sft_token_loss(logits, labels, self.temperature(logits.detach()), self.alpha)

        rows = {"labels": inputs.labels}
        return sum_token_chunks(per_token, inputs.student, rows, inputs.chunk_size, inputs.normaliser)
