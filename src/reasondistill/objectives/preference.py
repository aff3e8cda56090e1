"""Pair objectives: a correct (chosen, y⁺) and an incorrect (rejected, y⁻) completion of one prompt.

A micro-batch of P pairs holds 2P sequences: rows 0..P−1 are the chosen completions, rows P..2P−1
the rejected ones, row P+i pairing with row i. Each loss is a pure function of per-sequence summed
log-probabilities log π(y) = Σ_t log π(y_t | x, y_<t) and completion lengths |y|; the registered
objectives compute those (`sequence_logprobs`), apply the function per pair and return
Σ_pairs ℓ / (pairs in the global batch).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from .base import Objective, ObjectiveInputs, register
from .heads import Head, map_token_chunks
from .options import AFTOptions, DPOOptions, REDIOptions, SimPOOptions
from .sequence import token_nll


def token_logprob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log π(y_t | x, y_<t) per position: [n, V] logits, [n] labels → [n]."""
    return -token_nll(logits, labels)


def sequence_logprobs(inputs: ObjectiveInputs, head: Head | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ_t log π(y_t | x, y_<t) [num_sequences], completion tokens |y| [num_sequences]) of `head`.

    `head` defaults to the student (with gradients); any other head (the reference policy) is
    evaluated under no_grad.
    """
    head = inputs.student if head is None else head
    with torch.set_grad_enabled(torch.is_grad_enabled() and head is inputs.student):
        per_token = map_token_chunks(token_logprob, head, {"labels": inputs.labels}, inputs.chunk_size)
    totals = per_token.new_zeros(inputs.num_sequences).index_add(0, inputs.sequence, per_token)
    tokens = torch.bincount(inputs.sequence, minlength=inputs.num_sequences).to(per_token.dtype)
    return totals, tokens


def length_normalised(logprob: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log π(y) / |y|, the mean token log-probability, with |y| clamped ≥ 1."""
    return logprob / tokens.clamp_min(1)


def split_pairs(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen [P], rejected [P]) halves of a per-sequence [2P] tensor."""
    if values.shape[0] % 2:
        raise ValueError(
            f"pair objectives need 2P sequences (P chosen, then P rejected), got {values.shape[0]}"
        )
    half = values.shape[0] // 2
    return values[:half], values[half:]


def sum_over_pairs(per_pair: torch.Tensor, inputs: ObjectiveInputs) -> torch.Tensor:
    """Σ over the micro-batch's pairs / pairs in the global batch."""
    return per_pair.sum() / inputs.normaliser


# --- formulas: [P] tensors in, [P] losses out -------------------------------------------------------


def redi_loss(
    chosen_mean_logp: torch.Tensor,
    rejected_mean_logp: torch.Tensor,
    chosen_coef: float = 1.0,
    rejected_coef: float = 0.8,
    negative_weight_gamma: float | None = None,
    detach_negative_weight: bool = False,
) -> torch.Tensor:
    """REDI ℓ = −c⁺ · log π(y⁺)/|y⁺| + w · c⁻ · log π(y⁻)/|y⁻| (arguments are the mean log-probs).

    w = 1, or with `negative_weight_gamma` γ: w = exp(γ · log π(y⁻)/|y⁻|), not detached unless
    `detach_negative_weight` (the reference code does not detach it).
    """
    weight = 1.0
    if negative_weight_gamma is not None:
        weight = torch.exp(negative_weight_gamma * rejected_mean_logp)
        if detach_negative_weight:
            weight = weight.detach()
    return -chosen_coef * chosen_mean_logp + rejected_coef * weight * rejected_mean_logp


def dpo_loss(
    chosen_logratio: torch.Tensor,
    rejected_logratio: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """DPO ℓ = −log σ(β·h), h = [log π(y⁺) − log π_ref(y⁺)] − [log π(y⁻) − log π_ref(y⁻)].

    Arguments are the log-ratios log π(y) − log π_ref(y) of whole sequences. With label smoothing ε
    (conservative DPO): ℓ = −(1−ε)·log σ(β·h) − ε·log σ(−β·h).
    """
    margin = beta * (chosen_logratio - rejected_logratio)
    loss = -F.logsigmoid(margin)
    if label_smoothing:
        loss = (1 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-margin)
    return loss


def simpo_loss(
    chosen_mean_logp: torch.Tensor, rejected_mean_logp: torch.Tensor, beta: float = 2.0, gamma: float = 1.0
) -> torch.Tensor:
    """SimPO ℓ = −log σ(β/|y⁺|·log π(y⁺) − β/|y⁻|·log π(y⁻) − γ) (arguments are the mean log-probs)."""
    return -F.logsigmoid(beta * (chosen_mean_logp - rejected_mean_logp) - gamma)


def aft_loss(
    chosen_score: torch.Tensor,
    rejected_score: torch.Tensor,
    constraint: Literal["detach", "boundary"] = "detach",
    boundary_margin: float = 1.0,
    sft_weight: float = 1.0,
) -> torch.Tensor:
    """AFT ℓ = −w·s(p) + log(1 + exp(s(n) − s(p))) + constraint, with scores s(c) = log π(c)/|c|.

    −s(p) is the token-mean NLL of the positive (the SFT term, weight w). Constraint `detach`:
    s(n) → sg[s(n)] in the ranking term and nothing added (negatives are never pushed down);
    `boundary`: the ranking term with live s(n), plus log(1 + exp(B − s(n))), B = sg[s(p)] − γ.
    """
    ranked = rejected_score.detach() if constraint == "detach" else rejected_score
    loss = -sft_weight * chosen_score + F.softplus(ranked - chosen_score)
    if constraint == "boundary":
        loss = loss + F.softplus(chosen_score.detach() - boundary_margin - rejected_score)
    return loss


# --- registered objectives -----------------------------------------------------------------------


@register
class REDI(REDIOptions, Objective):
    """Reinforcement Distillation (arXiv 2505.24850). Stage 1 is plain `sft` on the positive traces;
    a REDI recipe runs `sft`, then `redi` on pairs from the SFT checkpoint (the paper: lr 1e-6,
    1 epoch). Lengths |y| are completion tokens, clamped ≥ 1; the loss is normalised per sequence,
    then summed over pairs / pairs in the global batch (the batch mean of the reference code).
    `negative_weighting` multiplies the negative term by w = exp(γ·log π(y⁻)/|y⁻|) (off by default,
    γ = 1.0); the reference code does not detach w, and neither does this by default: then the
    negative term c⁻·w·s has gradient c⁻·w·(1 + γ·s) in s = log π(y⁻)/|y⁻|, which pushes s toward
    −1/γ from either side instead of down without bound. `detach_negative_weight` makes w a constant
    (it then only down-weights already-unlikely negatives). Without a reference or KL term the
    negative log-likelihood can fall without bound: keep c⁻ < c⁺, a small learning rate, 1 epoch.
    """

    def __call__(self, inputs: ObjectiveInputs) -> torch.Tensor:
        chosen, rejected = split_pairs(length_normalised(*sequence_logprobs(inputs)))
        gamma = self.negative_weighting_gamma if self.negative_weighting else None
        losses = redi_loss(
            chosen, rejected, self.chosen_coef, self.rejected_coef, gamma, self.detach_negative_weight
        )
        return sum_over_pairs(losses, inputs)


@register
class DPO(DPOOptions, Objective):
    """Direct Preference Optimization (Rafailov et al. 2023), with the frozen starting weights as
    π_ref; log-probs are summed over the completion (not length-normalised). β = 0.1 is the paper's
    and TRL's default. `label_smoothing` ε > 0 is conservative DPO (cDPO): the preference label is
    assumed flipped with probability ε.
    """

    def __call__(self, inputs: ObjectiveInputs) -> torch.Tensor:
        if inputs.reference is None:
            raise ValueError("dpo needs the reference policy's hidden states (inputs.reference)")
        policy, _ = sequence_logprobs(inputs)
        reference, _ = sequence_logprobs(inputs, inputs.reference)
        chosen, rejected = split_pairs(policy - reference)
        return sum_over_pairs(dpo_loss(chosen, rejected, self.beta, self.label_smoothing), inputs)


@register
class SimPO(SimPOOptions, Objective):
    """Simple Preference Optimization (Meng et al. 2024). Defaults β = 2.0, γ = 1.0 are the official
    Llama-3-Base-8B configuration (beta 2.0, gamma_beta_ratio 0.5; the code computes
    −log σ(β·(Δ − γ/β)), the same thing). The code's default ratio 0.25 gives γ = 0.5; the paper
    tunes β ∈ [2, 10] and γ ∈ [0.3, 1.6] per model.
    """

    def __call__(self, inputs: ObjectiveInputs) -> torch.Tensor:
        chosen, rejected = split_pairs(length_normalised(*sequence_logprobs(inputs)))
        return sum_over_pairs(simpo_loss(chosen, rejected, self.beta, self.gamma), inputs)


@register
class AFT(AFTOptions, Objective):
    """Alignment Fine-Tuning (arXiv 2309.02144), on a model already fine-tuned on CoT data. The paper
    samples k CoTs per question and ranks every positive above every negative with one group term
    log(1 + Σ_p Σ_n exp(s(n) − s(p))); here a group is fed as all its (p, n) pairs and each pair
    contributes its own term, which is the group term when a question has one positive and one
    negative and a pairwise (RankNet-style) version otherwise; the SFT term then counts a positive
    once per pair it appears in. Questions with only positives belong in an `sft` stage.

    Constraints keep negatives from being pushed to −∞. `detach` (DC): s(n) is stop-gradient in the
    ranking term, so only positives rise and rejected sequences get no gradient at all. `boundary`
    (BC): s(n) is live in the ranking term, plus log(1 + exp(B − s(n))) with B = sg[s(p)] − γ; this
    form is the card's inference (B = min_p sg[s(p)] − γ, one pair here), not verified against the
    paper. The two terms balance at s(n) = s(p) − γ/2: the negative settles γ/2 nats per token below
    the positive. γ was not recovered from the paper; 1.0 is a guess.
    """

    def __call__(self, inputs: ObjectiveInputs) -> torch.Tensor:
        chosen, rejected = split_pairs(length_normalised(*sequence_logprobs(inputs)))
        losses = aft_loss(chosen, rejected, self.constraint, self.boundary_margin, self.sft_weight)
        return sum_over_pairs(losses, inputs)
