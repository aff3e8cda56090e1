"""Per-token divergences between teacher and student next-token distributions.

Every function takes log-probabilities `student` and `teacher` of shape [n, K] over the same
support (the vocabulary, or a teacher's top-k tokens plus one tail bin) and returns [n]: one value
per position. Names state the direction: `kl_teacher_student` is KL(p_T ‖ p_S) = Σ p_T log(p_T/p_S),
the "forward" KL of the distillation literature (mean-seeking); `kl_student_teacher` is
KL(p_S ‖ p_T), the "reverse" KL (mode-seeking).

Temperature is applied before (`shared_support`), to both models, and the loss is not multiplied
by τ² (TRL's convention; Hinton et al. multiply by τ² to keep gradient scale across τ).
"""

from __future__ import annotations

import math

import torch

from .heads import SparseTargets

# Floor for the log-mass of a tail bin: keeps 0·log 0 terms finite when the top-k covers everything.
TAIL_FLOOR = -25.0


def kl_teacher_student(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Forward KL(p_T ‖ p_S) = Σ_v p_T(v) (log p_T(v) − log p_S(v))."""
    return (teacher.exp() * (teacher - student)).sum(-1)


def kl_student_teacher(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Reverse KL(p_S ‖ p_T) = Σ_v p_S(v) (log p_S(v) − log p_T(v))."""
    return (student.exp() * (student - teacher)).sum(-1)


def _log_mixture(a: torch.Tensor, b: torch.Tensor, weight_a: float) -> torch.Tensor:
    """log(w·p_a + (1−w)·p_b), computed in log space."""
    return torch.logaddexp(a + math.log(weight_a), b + math.log1p(-weight_a))


def generalized_jsd(student: torch.Tensor, teacher: torch.Tensor, beta: float) -> torch.Tensor:
    """Generalized JSD_β = β·KL(p_T ‖ M) + (1−β)·KL(p_S ‖ M), with M = β·p_T + (1−β)·p_S.

    β weights the teacher inside M, as in TRL's `generalized_jsd_loss` and GKD: β = 0 is the
    forward KL(p_T ‖ p_S) and β = 1 the reverse KL(p_S ‖ p_T) (the ends are the limits of
    JSD_β/(β(1−β)) and are special-cased to the exact KLs, as TRL does); β = 0.5 is the symmetric JS.
    """
    if beta == 0:
        return kl_teacher_student(student, teacher)
    if beta == 1:
        return kl_student_teacher(student, teacher)
    mixture = _log_mixture(teacher, student, beta)
    return beta * kl_teacher_student(mixture, teacher) + (1 - beta) * kl_teacher_student(mixture, student)


def skew_kl_teacher_mixture(student: torch.Tensor, teacher: torch.Tensor, skew: float) -> torch.Tensor:
    """Skew forward KL (DistiLLM) = KL(p_T ‖ λ·p_T + (1−λ)·p_S), λ = `skew`; λ = 0 is the forward KL."""
    if skew == 0:
        return kl_teacher_student(student, teacher)
    return kl_teacher_student(_log_mixture(teacher, student, skew), teacher)


def skew_kl_student_mixture(student: torch.Tensor, teacher: torch.Tensor, skew: float) -> torch.Tensor:
    """Skew reverse KL (DistiLLM) = KL(p_S ‖ λ·p_S + (1−λ)·p_T), λ = `skew`; λ = 0 is the reverse KL."""
    if skew == 0:
        return kl_student_teacher(student, teacher)
    return kl_student_teacher(student, _log_mixture(student, teacher, skew))


def total_variation(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Total variation distance TV = ½·Σ_v |p_T(v) − p_S(v)|."""
    return 0.5 * (teacher.exp() - student.exp()).abs().sum(-1)


def adaptive_kl(student: torch.Tensor, teacher: torch.Tensor, head_mass: float) -> torch.Tensor:
    """Adaptive KL (AKL, Wu et al. 2024) = g_head/(g_head+g_tail)·KL(p_T‖p_S) + g_tail/(g_head+g_tail)·KL(p_S‖p_T).

    The head is the teacher's most likely tokens up to cumulative teacher mass `head_mass` (μ,
    inclusive of the token that crosses it); g_head = Σ_head |p_T − p_S| and g_tail = Σ_tail |p_T − p_S|.
    The gap weights are constants of the step (stop-gradient), as in DSKD and TAID's `adaptive_kl`:
    forward KL covers the head where the gap sits there, reverse KL the tail otherwise.
    """
    p_teacher = teacher.exp()
    sorted_p, order = p_teacher.sort(-1, descending=True)
    before = sorted_p.cumsum(-1) - sorted_p  # teacher mass ranked strictly above each token
    in_head = torch.zeros_like(p_teacher, dtype=torch.bool).scatter(-1, order, before < head_mass)
    gap = (p_teacher - student.exp()).abs().detach()
    head_gap = (gap * in_head).sum(-1)
    tail_gap = (gap * ~in_head).sum(-1)
    head_weight = head_gap / (head_gap + tail_gap).clamp_min(1e-12)
    return head_weight * kl_teacher_student(student, teacher) + (1 - head_weight) * kl_student_teacher(
        student, teacher
    )


def entropy(logprobs: torch.Tensor) -> torch.Tensor:
    """H(p) = −Σ_v p(v) log p(v)."""
    return -(logprobs.exp() * logprobs).sum(-1)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − eˣ) for x ≤ 0, accurate at both ends (Mächler 2012)."""
    x = x.clamp(max=-1e-7)
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def shared_support(
    student_logits: torch.Tensor, teacher: torch.Tensor | SparseTargets, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(student, teacher) log-probabilities [n, K] over one support, both at `temperature`.

    Dense teacher logits [n, V]: the vocabulary, K = V. Sparse top-k targets: the teacher's k tokens
    plus a tail bin holding the rest of each distribution, K = k + 1; the student's tail is
    log(1 − Σ_top-k p_S). With k = V the tail bins are empty and this equals the dense computation.
    The store holds temperature-1 log-probabilities; at τ ≠ 1 they are re-tempered over the k + 1
    bins (p^(1/τ) renormalised), which treats the tail as one token, an approximation.
    """
    student = torch.log_softmax(student_logits / temperature, dim=-1)
    if isinstance(teacher, torch.Tensor):
        return student, torch.log_softmax(teacher / temperature, dim=-1)
    student_top = student.gather(-1, teacher.ids)
    student_tail = log1mexp(torch.logsumexp(student_top, -1)).clamp_min(TAIL_FLOOR)
    teacher_bins = torch.cat([teacher.logprobs, teacher.tail_logprob[:, None]], -1)
    if temperature != 1:
        teacher_bins = torch.log_softmax(teacher_bins / temperature, dim=-1)
    # floor the tail after tempering: a floor raised to 1/τ would put mass in an empty tail (e^(−25/4) at τ = 4)
    teacher_bins = torch.cat([teacher_bins[:, :-1], teacher_bins[:, -1:].clamp_min(TAIL_FLOOR)], -1)
    return torch.cat([student_top, student_tail[:, None]], -1), teacher_bins
