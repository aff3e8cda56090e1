"""Token-selective distillation: objectives that weight, select or re-shape the per-token targets.

* `tsd_kd` (TSD-KD): a generalized JSD weighted by how much more uncertain the student is than the
  teacher, an entropy regulariser on the student's uncertain tokens, and a ListMLE ranking term in
  which the teacher re-orders the student's own top-K candidates.
* `first` (FIRST): KL toward the teacher's top-k distribution only (renormalised, or with one tail
  bin), optionally calibrated by a teacher temperature (`fit_calibration_temperature`).
* `adaspec` (AdaSPEC): forward KL on the tokens where the student lags a frozen reference draft
  the most.

Method card numbers refer to `shared/reference/method-cards.md` (1: TSD-KD, 9: AdaSPEC, 10: FIRST).
"""

from __future__ import annotations

import math

import torch

from ..errors import UserError
from .base import Objective, ObjectiveInputs, register, sum_over_tokens
from .divergences import TAIL_FLOOR, entropy, generalized_jsd, kl_teacher_student, shared_support
from .heads import SparseTargets, map_token_chunks, sum_token_chunks
from .options import AdaSPECOptions, FIRSTOptions, TSDKDOptions

# ---------------------------------------------------------------------------------------------
# TSD-KD
# ---------------------------------------------------------------------------------------------


def entropy_weight(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """TSD-KD's token weight w_t = sg[σ(H(p_S) − H(p_T))] from log-probabilities [n, K] → [n].

    Above ½ where the student is more uncertain than the teacher; a constant of the step.
    """
    return torch.sigmoid(entropy(student) - entropy(teacher)).detach()


def listmle_suffix(scores: torch.Tensor) -> torch.Tensor:
    """ListMLE of scores already in the target order: −Σ_k [s_(k) − log Σ_{j≥k} exp s_(j)], [n, K] → [n].

    The negative log Plackett-Luce likelihood of the order (k = 1 first): each item competes with the
    items ranked at or below it (suffix sums), so it is small when s_(1) > s_(2) > ... by wide
    margins. (TSD-KD's released code uses inclusive *prefix* sums, Σ_{j≤k}, which is the likelihood
    of the reversed order; card 1 calls suffix sums the faithful-to-intent choice.)
    """
    suffix = torch.logcumsumexp(scores.flip(-1), dim=-1).flip(-1)
    return -(scores - suffix).sum(-1)


def teacher_scores_at(teacher: torch.Tensor | SparseTargets, ids: torch.Tensor) -> torch.Tensor:
    """The teacher's score of tokens `ids` [n, K]: its logits (dense), or its stored log-probs (sparse).

    Sparse targets know only their top-k tokens; a token outside them scores −∞, i.e. ranks below
    every token the store itemises (ties among them are broken by the caller).
    """
    if isinstance(teacher, torch.Tensor):
        return teacher.gather(-1, ids)
    known = ids[:, :, None] == teacher.ids[:, None, :]  # [n, K, k]
    scores = torch.where(known, teacher.logprobs[:, None, :], -math.inf)
    return scores.amax(-1) if scores.shape[-1] else torch.full(ids.shape, -math.inf, device=ids.device)


def teacher_ranked_candidates(
    student_logits: torch.Tensor, teacher: torch.Tensor | SparseTargets, k: int
) -> torch.Tensor:
    """The student's top-k logits [n, k], re-ordered by the teacher's descending score of those tokens.

    Ties in the teacher's score (sparse targets: candidates outside the teacher's top-k) keep the
    student's own order (stable sort).
    """
    values, ids = student_logits.topk(min(k, student_logits.shape[-1]), dim=-1)  # descending student order
    order = teacher_scores_at(teacher, ids).argsort(dim=-1, descending=True, stable=True)
    return values.gather(-1, order)


def early_entropy_positions(
    entropies: torch.Tensor, sequence: torch.Tensor, num_sequences: int, share: float
) -> torch.Tensor:
    """Bool [N]: the first positions of each sequence until its cumulative entropy share reaches `share`.

    Per sequence, the entropies are normalised to sum 1 and a position is kept while the share of
    the positions strictly before it is < `share`, so the position that crosses `share` is included
    (the first position of a sequence always is). `sequence` [N] names each position's row; the
    positions of a row are in order. (TSD-KD's code computes one cut-off on the batch-flattened
    entropies and reuses it as a position in every row; this is the per-sequence version.)
    """
    e = entropies.detach().double()
    order = torch.argsort(sequence, stable=True)  # rows contiguous, positions in order within a row
    e_sorted, row = e[order], sequence[order]
    totals = torch.zeros(num_sequences, dtype=e.dtype, device=e.device).index_add_(0, sequence, e)
    row_start = totals.cumsum(0) - totals
    before = (e_sorted.cumsum(0) - e_sorted - row_start[row]).clamp_min(0)
    first = torch.ones_like(row, dtype=torch.bool)
    first[1:] = row[1:] != row[:-1]
    keep_sorted = first | (before < share * totals[row])
    return torch.empty_like(keep_sorted).scatter_(0, order, keep_sorted)


def high_entropy_mean(entropies: torch.Tensor, quantile: float) -> torch.Tensor:
    """Mean of the entropies [N] at or above their `quantile`-quantile (linear interpolation), 0 if N = 0."""
    if entropies.numel() == 0:
        return entropies.sum()
    threshold = torch.quantile(entropies.detach().float(), quantile)
    selected = entropies.detach() >= threshold
    return (entropies * selected).sum() / selected.sum()


@register
class TSDKD(TSDKDOptions, Objective):
    """The three terms, at `temperature`:

    * Direct: D_t = JSD_β with M = β·p_T + (1−β)·p_S (β weights the teacher, TRL convention; the
      ends β ∈ {0, 1} are the exact forward/reverse KL, where the paper code would give 0 and
      (1−β)·0), weighted by w_t = sg[σ(H(p_S,t) − H(p_T,t))]; summed over completion tokens and
      divided by `normaliser`.
    * Entropy: e_t = H(p_S,t) over the full vocabulary (gradient flows); L_ent = mean of e_t over
      the completion tokens with e_t ≥ the q-quantile of the micro-batch's completion-token
      entropies (padding and prompt never enter the mask: the code's pad leak is fixed).
    * Ranking: at each position the student's top-K tokens, ordered by the teacher's logit, scored
      by ListMLE with suffix sums (faithful to intent; the released code uses prefix sums, i.e.
      the reversed order), averaged over the earliest positions of each sequence that hold
      `ranking_entropy_share` of that sequence's student entropy (per sequence; the code uses one
      batch-flattened index).
    * L = L_dir + entropy_weight·L_ent + α·L_ind, all at `temperature`.

    L_ent and L_ind are per-micro-batch means, as in the paper code. Each is scaled by the
    micro-batch's share of the global completion tokens (N_micro / normaliser, 1 with a single
    micro-batch per step) so that the micro-batches of a gradient-accumulation step, which the
    trainer sums, average them instead of counting them once per micro-batch.

    Sparse teacher targets: the direct term and the weight use the k + 1 bins of `shared_support`
    (both entropies over those bins); the ranking uses the stored log-prob of a candidate in the
    teacher's top-k and ranks candidates outside it below all known ones, in the student's order.
    """

    def __call__(self, inputs: ObjectiveInputs) -> torch.Tensor:
        if inputs.teacher is None:
            raise UserError("objective tsd_kd needs a teacher")
        tau = self.temperature

        def per_token(logits, teacher):
            student, target = shared_support(logits, teacher, tau)
            direct = entropy_weight(student, target) * generalized_jsd(student, target, self.beta)
            if isinstance(teacher, torch.Tensor):
                student_entropy = entropy(student)  # the support is the vocabulary
                ranked = teacher_ranked_candidates(logits / tau, teacher / tau, self.top_k)
            else:
                student_entropy = entropy(torch.log_softmax(logits / tau, dim=-1))
                ranked = teacher_ranked_candidates(logits / tau, teacher, self.top_k)
            return direct, student_entropy, listmle_suffix(ranked)

        direct, student_entropy, ranking = map_token_chunks(
            per_token, inputs.student, {"teacher": inputs.teacher}, inputs.chunk_size
        )
        loss = sum_over_tokens(direct, inputs)
        if len(direct) == 0:
            return loss
        terms = {"direct": loss.detach()}
        share = len(direct) / inputs.normaliser  # micro-batch means → share of the global batch
        if self.entropy_weight:
            terms["entropy"] = share * high_entropy_mean(student_entropy, self.entropy_quantile)
            loss = loss + self.entropy_weight * terms["entropy"]
        if self.alpha:
            early = early_entropy_positions(
                student_entropy, inputs.sequence, inputs.num_sequences, self.ranking_entropy_share
            )
            terms["ranking"] = share * (ranking * early).sum() / early.sum()
            loss = loss + self.alpha * terms["ranking"]
        self.note_terms(inputs.step, **{name: term.detach() for name, term in terms.items()})
        return loss


# ---------------------------------------------------------------------------------------------
# FIRST
# ---------------------------------------------------------------------------------------------


def teacher_top_k(teacher: torch.Tensor | SparseTargets, k: int) -> SparseTargets:
    """The teacher's k most likely tokens with their log-probs and the log-mass of all the rest.

    Dense logits: the top-k of log_softmax (temperature 1); the tail is the log-sum of the other
    tokens (−∞ when k = V). Sparse targets: the first k of the stored tokens by log-prob (all of
    them when fewer are stored); dropped stored tokens join the stored tail.
    """
    if isinstance(teacher, torch.Tensor):
        logprobs = torch.log_softmax(teacher.float(), dim=-1)
        top, ids = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
        tail = torch.logsumexp(logprobs.scatter(-1, ids, -math.inf), dim=-1)
        return SparseTargets(ids, top, tail)
    logprobs, order = teacher.logprobs.sort(dim=-1, descending=True)
    ids = teacher.ids.gather(-1, order)
    tail = teacher.tail_logprob
    if logprobs.shape[-1] > k:
        tail = torch.logaddexp(tail, torch.logsumexp(logprobs[:, k:], dim=-1))
    return SparseTargets(ids[:, :k], logprobs[:, :k], tail)


def concentrated_bins(logprobs: torch.Tensor, epsilon: float) -> torch.Tensor:
    """FIRST's `linear` normalisation in log space: log[(p + ε)/Σ(p + ε)] of log-probs [n, k] → [n, k]."""
    return torch.log_softmax(torch.logaddexp(logprobs, torch.full_like(logprobs, math.log(epsilon))), dim=-1)


def first_bins(
    student_logits: torch.Tensor, top: SparseTargets, tail: bool, epsilon: float, teacher_temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(student, teacher) log-probabilities over FIRST's bins: the teacher's top-k ids (+ one tail bin).

    `tail` False: both renormalised over the k ids as (p + ε)/Σ(p + ε). `tail` True: the k ids and
    the rest as one bin (`shared_support`), in log space. The teacher's bins are then calibrated:
    log_softmax(log p̂_T / T) over the bins (T = 1: unchanged); the student stays at temperature 1.
    """
    if tail:
        student, teacher = shared_support(student_logits, top)
    else:
        student_top = torch.log_softmax(student_logits, dim=-1).gather(-1, top.ids)
        student, teacher = concentrated_bins(student_top, epsilon), concentrated_bins(top.logprobs, epsilon)
    if teacher_temperature != 1:
        teacher = torch.log_softmax(teacher / teacher_temperature, dim=-1)
    return student, teacher


def fit_calibration_temperature(
    topk_logprobs: torch.Tensor,
    tail: torch.Tensor,
    label_in_topk_index: torch.Tensor,
    t_min: float = 0.05,
    t_max: float = 20.0,
    iterations: int = 100,
) -> float:
    """The teacher temperature T minimising the NLL of the observed next tokens over k + 1 bins.

    Bins: the teacher's top-k log-probs `topk_logprobs` [N, k] and the rest as one bin `tail` [N]
    (log-mass). The observed token of position i is bin `label_in_topk_index[i]`, or the tail bin
    where it is −1. NLL(T) = −mean_i log softmax(bins_i / T)[label_i] is convex in β = 1/T, so a
    golden-section search over β ∈ [1/t_max, 1/t_min] finds the minimiser (clamped to the range).

    This is FIRST's "trustworthy maximization" as temperature scaling, the standard calibration
    method (Guo et al. 2017): an inferred rule, since the paper states the goal (a calibrated
    target) and its code does not contain the fitting step. T > 1 softens an over-confident
    teacher, T < 1 sharpens an under-confident one.
    """
    bins = torch.cat([topk_logprobs.double(), tail.double().clamp_min(TAIL_FLOOR)[:, None]], dim=-1)
    labels = label_in_topk_index.long().clone()
    labels[labels < 0] = bins.shape[-1] - 1
    observed = bins.gather(-1, labels[:, None])[:, 0]

    def nll(beta: float) -> float:
        return (torch.logsumexp(bins * beta, dim=-1) - observed * beta).mean().item()

    lo, hi = 1 / t_max, 1 / t_min
    golden = (math.sqrt(5) - 1) / 2
    a, b = hi - golden * (hi - lo), lo + golden * (hi - lo)
    f_a, f_b = nll(a), nll(b)
    for _ in range(iterations):
        if f_a <= f_b:
            hi, b, f_b = b, a, f_a
            a = hi - golden * (hi - lo)
            f_a = nll(a)
        else:
            lo, a, f_a = a, b, f_b
            b = lo + golden * (hi - lo)
            f_b = nll(b)
    return 1 / ((lo + hi) / 2)


@register
class FIRST(FIRSTOptions, Objective):
    """Target bins from the teacher's top-k (dense top-k, or the first k of the stored targets by
    log-prob): `tail: false` (FIRST's `use_norm=linear`) renormalises teacher and student
    probabilities at those ids as (p + ε)/Σ(p + ε); `tail: true` (`use_other_token=yes`) adds the rest
    of each distribution as a (k+1)-th bin, in log space (the released code passes probabilities as
    log-probabilities there, which is not a KL). `teacher_temperature` T calibrates the target:
    log_softmax(log p̂_T / T) over the bins; fit it with `fit_calibration_temperature`.
    Loss per token: KL(p̂_T ‖ p̂_S); summed over completion tokens and divided by `normaliser`
    (token mean; the original sums over each sequence's positions and averages over sequences).
    The optional label smoothing of the original is not implemented.
    """

    def __call__(self, inputs: ObjectiveInputs) -> torch.Tensor:
        if inputs.teacher is None:
            raise UserError("objective first needs a teacher")

        def per_token(logits, teacher):
            top = teacher_top_k(teacher, self.k)
            student, target = first_bins(logits, top, self.tail, self.epsilon, self.teacher_temperature)
            return kl_teacher_student(student, target)

        rows = {"teacher": inputs.teacher}
        return sum_token_chunks(per_token, inputs.student, rows, inputs.chunk_size, inputs.normaliser)


# ---------------------------------------------------------------------------------------------
# AdaSPEC
# ---------------------------------------------------------------------------------------------


def keep_largest_fraction(delta: torch.Tensor, keep_fraction: float) -> torch.Tensor:
    """Bool [N]: Δ_t ≥ the (1 − k)-quantile of Δ (linear interpolation, as `torch.quantile`).

    With distinct values this keeps N − ⌈(N − 1)(1 − k)⌉ tokens, the largest ones.
    """
    if delta.numel() == 0:
        return torch.zeros_like(delta, dtype=torch.bool)
    delta = delta.detach().float()
    return delta >= torch.quantile(delta, 1 - keep_fraction)


@register
class AdaSPEC(AdaSPECOptions, Objective):
    """ℓ_draft = KL(p_T ‖ p_S), ℓ_ref = KL(p_T ‖ p_ref) per completion token, Δ = sg[ℓ_draft − ℓ_ref];
    keep S = {t : Δ_t ≥ the (1 − k)-quantile of the micro-batch's Δ}, k = `keep_fraction`;
    L = Σ_{t∈S} ℓ_draft / normaliser. Dividing by all completion tokens (as the code does with
    `num_items_in_batch`), not |S|, scales the loss by about k. Tokens where the reference also
    has a high loss (Δ small or negative) are dropped. The reference is a frozen draft trained
    with plain forward-KL KD (`inputs.reference`). Sparse teacher targets: both KLs over the
    k + 1 bins of `shared_support`.
    """

    def __call__(self, inputs: ObjectiveInputs) -> torch.Tensor:
        if inputs.teacher is None:
            raise UserError("objective adaspec needs a teacher")
        if inputs.reference is None:
            raise UserError("objective adaspec needs a reference model (a draft distilled with forward KL)")

        def per_token(logits, teacher, reference):
            draft = kl_teacher_student(*shared_support(logits, teacher))
            ref = kl_teacher_student(*shared_support(reference, teacher))
            return draft, ref

        rows = {"teacher": inputs.teacher, "reference": inputs.reference}
        draft, ref = map_token_chunks(per_token, inputs.student, rows, inputs.chunk_size)
        keep = keep_largest_fraction(draft.detach() - ref, self.keep_fraction)
        return sum_over_tokens(draft * keep, inputs)
