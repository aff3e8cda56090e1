"""Token-level divergences and distillation objectives against written-out formulas and TRL.

References are computed in float64, position by position, from the definitions in the loss
catalogue (p_T teacher, p_S student): forward KL Σ p_T log(p_T/p_S), reverse KL Σ p_S log(p_S/p_T),
generalized JSD_β with M = βp_T + (1−β)p_S, skew KLs, TVD, AKL and the top-k + tail forward KL.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reasondistill.objectives import OBJECTIVES, make_objective
from reasondistill.objectives.base import ObjectiveInputs
from reasondistill.objectives.divergences import (
    adaptive_kl,
    generalized_jsd,
    kl_student_teacher,
    kl_teacher_student,
    shared_support,
    skew_kl_student_mixture,
    skew_kl_teacher_mixture,
    total_variation,
)
from reasondistill.objectives.heads import Head, SparseTargets, map_token_chunks, sum_token_chunks

TOLERANCE = {"atol": 1e-5, "rtol": 1e-5}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tensors here are tiny: one intra-op thread is faster than waking a pool (and shares the CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _kl(p, q):
    return float((p * (p / q).log()).sum())


def _akl_reference(ps, pt, head_mass):
    """AKL with an explicit loop: sort the teacher, grow the head to mass μ, weight the two KLs by gaps."""
    order = sorted(range(len(pt)), key=lambda v: -float(pt[v]))
    head, above = set(), 0.0
    for v in order:
        if above < head_mass:  # the mass ranked strictly above v is < μ: v is in the head
            head.add(v)
        above += float(pt[v])
    head_gap = sum(abs(float(pt[v] - ps[v])) for v in range(len(pt)) if v in head)
    tail_gap = sum(abs(float(pt[v] - ps[v])) for v in range(len(pt)) if v not in head)
    weight = head_gap / max(head_gap + tail_gap, 1e-12)
    return weight * _kl(pt, ps) + (1 - weight) * _kl(ps, pt)


# name -> (divergence(student_logprobs, teacher_logprobs), reference(p_S, p_T) on float64 vectors)
DIVERGENCES = {
    "forward_kl": (kl_teacher_student, lambda ps, pt: _kl(pt, ps)),
    "reverse_kl": (kl_student_teacher, lambda ps, pt: _kl(ps, pt)),
    **{
        f"jsd_{beta}": (
            lambda s, t, beta=beta: generalized_jsd(s, t, beta),
            lambda ps, pt, beta=beta: (
                beta * _kl(pt, beta * pt + (1 - beta) * ps)
                + (1 - beta) * _kl(ps, beta * pt + (1 - beta) * ps)
            ),
        )
        for beta in (0.1, 0.5, 0.9)
    },
    "jsd_0": (lambda s, t: generalized_jsd(s, t, 0.0), lambda ps, pt: _kl(pt, ps)),
    "jsd_1": (lambda s, t: generalized_jsd(s, t, 1.0), lambda ps, pt: _kl(ps, pt)),
    "skew_forward_kl_0.1": (
        lambda s, t: skew_kl_teacher_mixture(s, t, 0.1),
        lambda ps, pt: _kl(pt, 0.1 * pt + 0.9 * ps),
    ),
    "skew_reverse_kl_0.1": (
        lambda s, t: skew_kl_student_mixture(s, t, 0.1),
        lambda ps, pt: _kl(ps, 0.1 * ps + 0.9 * pt),
    ),
    "skew_forward_kl_0": (lambda s, t: skew_kl_teacher_mixture(s, t, 0.0), lambda ps, pt: _kl(pt, ps)),
    "skew_reverse_kl_0": (lambda s, t: skew_kl_student_mixture(s, t, 0.0), lambda ps, pt: _kl(ps, pt)),
    "tvd": (total_variation, lambda ps, pt: 0.5 * float((pt - ps).abs().sum())),
    **{
        f"akl_{mu}": (
            lambda s, t, mu=mu: adaptive_kl(s, t, mu),
            lambda ps, pt, mu=mu: _akl_reference(ps, pt, mu),
        )
        for mu in (0.3, 0.5, 0.9, 1.0)
    },
}

# objectives that compare a teacher with the student token by token (option sets to cover)
KD_OBJECTIVES = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("jsd", {"beta": 0.5}),
    ("jsd", {"beta": 0.1, "temperature": 2.0}),
    ("skew_forward_kl", {}),
    ("skew_reverse_kl", {}),
    ("tvd", {}),
    ("akl", {}),
    ("taid", {}),
    ("forward_kl", {"sft_weight": 0.5}),
]


def logits(seed: int, n: int = 6, vocab: int = 23, scale: float = 2.0) -> torch.Tensor:
    return torch.randn(n, vocab, generator=torch.Generator().manual_seed(seed)) * scale


def inputs(student, teacher=None, labels=None, normaliser=None, chunk_size=1024, step=0, progress=0.0):
    n = len(student)
    if labels is None:
        vocab = student.hidden.shape[1] if student.weight is None else student.weight.shape[0]
        labels = torch.arange(n) % vocab
    return ObjectiveInputs(
        student=student,
        labels=labels,
        normaliser=n if normaliser is None else normaliser,
        sequence=torch.zeros(n, dtype=torch.long),
        num_sequences=1,
        teacher=teacher,
        chunk_size=chunk_size,
        step=step,
        progress=progress,
    )


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    vocab=st.integers(2, 60),
    scale=st.sampled_from([0.5, 3.0, 10.0]),
)
def test_every_divergence_is_zero_on_equal_distributions_and_positive_on_different_ones(seed, vocab, scale):
    student_logits, teacher_logits = logits(seed, 4, vocab, scale), logits(seed + 1, 4, vocab, scale)
    for dtype in (torch.float32, torch.float64):
        student = torch.log_softmax(student_logits.to(dtype), -1)
        teacher = torch.log_softmax(teacher_logits.to(dtype), -1)
        for name, (divergence, _) in DIVERGENCES.items():
            same = divergence(student, student.clone())
            assert same.shape == (4,) and same.abs().max().item() < 1e-6, name
            if dtype == torch.float64:  # independent draws differ by far more than float64 rounding
                assert (divergence(student, teacher) > 0).all(), name


@pytest.mark.parametrize("name", list(DIVERGENCES))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_each_divergence_equals_its_written_out_formula(name, seed):
    divergence, reference = DIVERGENCES[name]
    student_logits, teacher_logits = logits(3 * seed), logits(3 * seed + 1)
    teacher_logits[0] = student_logits[0] + 0.01 * teacher_logits[0]  # one position with a small gap
    if seed == 2:
        teacher_logits[1, :] = -5.0
        teacher_logits[1, 3] = 5.0  # a peaked teacher: the AKL head is one token
    ours = divergence(torch.log_softmax(student_logits, -1), torch.log_softmax(teacher_logits, -1))
    expected = []
    for s, t in zip(student_logits.double(), teacher_logits.double(), strict=True):
        expected.append(reference(torch.softmax(s, -1), torch.softmax(t, -1)))
    torch.testing.assert_close(ours.double(), torch.tensor(expected, dtype=torch.float64), **TOLERANCE)


def test_akl_head_includes_the_token_that_crosses_the_head_mass():
    # teacher 0.6 / 0.3 / 0.1, student 0.2 / 0.5 / 0.3: gaps 0.4 / 0.2 / 0.2
    teacher = torch.tensor([[0.6, 0.3, 0.1]], dtype=torch.float64).log()
    student = torch.tensor([[0.2, 0.5, 0.3]], dtype=torch.float64).log()
    fkl, rkl = kl_teacher_student(student, teacher), kl_student_teacher(student, teacher)
    for head_mass, head_weight in [
        (0.3, 0.5),  # head {0}: the first token always, even past μ
        (0.55, 0.5),  # head {0}
        (0.65, 0.75),  # head {0, 1}: 0.6 ranked above token 1 is < μ
        (0.95, 1.0),  # head {0, 1, 2}: pure forward KL
    ]:
        expected = head_weight * fkl + (1 - head_weight) * rkl
        torch.testing.assert_close(adaptive_kl(student, teacher, head_mass), expected)
    # the order is the teacher's, not the vocabulary's: permuting both permutes nothing
    permutation = torch.tensor([2, 0, 1])
    torch.testing.assert_close(
        adaptive_kl(student[:, permutation], teacher[:, permutation], 0.65), 0.75 * fkl + 0.25 * rkl
    )


def test_jsd_ends_are_the_two_kls_and_its_middle_is_symmetric():
    student, teacher = torch.log_softmax(logits(10), -1), torch.log_softmax(logits(11), -1)
    torch.testing.assert_close(generalized_jsd(student, teacher, 0.0), kl_teacher_student(student, teacher))
    torch.testing.assert_close(generalized_jsd(student, teacher, 1.0), kl_student_teacher(student, teacher))
    torch.testing.assert_close(generalized_jsd(student, teacher, 0.5), generalized_jsd(teacher, student, 0.5))
    # β weights the teacher: swapping the arguments of JSD_β gives JSD_{1−β}
    torch.testing.assert_close(generalized_jsd(student, teacher, 0.2), generalized_jsd(teacher, student, 0.8))
    # JS is bounded by log 2, both KLs are not
    assert (generalized_jsd(student, teacher, 0.5) <= math.log(2) + 1e-6).all()


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_jsd_objective_matches_trl_generalized_jsd_loss(beta, temperature):
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gkd import GKDTrainer

    generator = torch.Generator().manual_seed(int(10 * beta + temperature))
    student = (torch.randn(3, 7, 19, generator=generator) * 3).requires_grad_()
    teacher = torch.randn(3, 7, 19, generator=generator) * 3
    labels = torch.randint(0, 19, (3, 7), generator=generator)
    labels[:, :2] = -100  # prompt
    labels[1, 5:] = -100  # padding
    mask = labels != -100
    count = int(mask.sum())
    trl = GKDTrainer.generalized_jsd_loss(
        student, teacher, labels=labels, beta=beta, temperature=temperature, num_items_in_batch=count
    )
    (trl_grad,) = torch.autograd.grad(trl, student)
    objective = make_objective("jsd", {"beta": beta, "temperature": temperature})
    ours = objective(inputs(Head(student[mask]), Head(teacher[mask]), labels=labels[mask], normaliser=count))
    (our_grad,) = torch.autograd.grad(ours, student)
    torch.testing.assert_close(ours, trl, **TOLERANCE)
    torch.testing.assert_close(our_grad, trl_grad, **TOLERANCE)
    assert our_grad[~mask].abs().max() == 0


def projected_heads(seed, n=10, hidden=8, vocab=37):
    generator = torch.Generator().manual_seed(seed)
    student = Head(
        torch.randn(n, hidden, generator=generator).requires_grad_(),
        (torch.randn(vocab, hidden, generator=generator) / 2).requires_grad_(),
    )
    teacher = Head(
        torch.randn(n, hidden + 4, generator=generator), torch.randn(vocab, hidden + 4, generator=generator)
    )
    return student, teacher


@pytest.mark.parametrize("name, options", KD_OBJECTIVES + [("sft", {})])
def test_chunked_loss_and_gradients_equal_the_unchunked_ones(name, options):
    results = []
    for chunk_size in (3, 1024):
        student, teacher = projected_heads(20)
        objective = make_objective(name, options)
        loss = objective(inputs(student, teacher if objective.needs_teacher else None, chunk_size=chunk_size))
        loss.backward()
        results.append((loss.detach(), student.hidden.grad, student.weight.grad))
    (loss3, hidden3, weight3), (loss_full, hidden_full, weight_full) = results
    torch.testing.assert_close(loss3, loss_full, **TOLERANCE)
    torch.testing.assert_close(hidden3, hidden_full, **TOLERANCE)
    torch.testing.assert_close(weight3, weight_full, **TOLERANCE)
    assert hidden3.abs().sum() > 0 and weight3.abs().sum() > 0


def fused_case(seed: int, bias: bool):
    """A student head with padded rows (45 real tokens of 50) and an optional bias, a teacher, labels."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(23, 8, generator=generator).requires_grad_()
    weight = (torch.randn(50, 8, generator=generator) / 2).requires_grad_()
    head_bias = torch.randn(50, generator=generator).requires_grad_() if bias else None
    teacher = Head(torch.randn(23, 6, generator=generator), torch.randn(50, 6, generator=generator), None, 45)
    labels = torch.randint(0, 45, (23,), generator=generator)
    return hidden, weight, head_bias, teacher, labels


def kd_with_nll(logits, teacher, labels):
    return kl_teacher_student(
        *shared_support(logits, teacher, 1.5)
    ) + 0.3 * torch.nn.functional.cross_entropy(logits, labels, reduction="none")


@pytest.mark.parametrize("bias", [False, True])
def test_gradients_computed_in_the_forward_pass_equal_autograds(bias):
    """`sum_token_chunks` (each chunk's gradients made as it is projected) against autograd through
    `map_token_chunks`: the same loss and gradients for the hidden states, the head (its padded rows
    get none) and the bias, scaled by the gradient that reaches the loss."""
    results = []
    for fused in (False, True):
        hidden, weight, head_bias, teacher, labels = fused_case(5, bias)
        student, rows = Head(hidden, weight, head_bias, 45), {"teacher": teacher, "labels": labels}
        if fused:
            loss = sum_token_chunks(kd_with_nll, student, rows, 7, torch.tensor(31.0))
        else:
            loss = map_token_chunks(kd_with_nll, student, rows, 7).sum() / 31.0
        (2.5 * loss).backward()
        results.append([loss.detach(), hidden.grad, weight.grad] + ([head_bias.grad] if bias else []))
    for ours, reference in zip(*results, strict=True):
        torch.testing.assert_close(ours, reference, **TOLERANCE)
    assert results[1][2][45:].abs().max() == 0 and results[1][2][:45].abs().max() > 0


def test_the_fused_sum_projects_each_chunk_once(monkeypatch):
    """Nothing is recomputed in the backward pass: one projection of the student head per chunk (of
    half the chunk size: a fused chunk holds gradients too), where checkpointed chunks project every
    chunk but the last twice."""
    calls = []
    linear = torch.nn.functional.linear

    def counting(x, w, b=None):
        calls.append(w.shape[1])
        return linear(x, w, b)

    monkeypatch.setattr(torch.nn.functional, "linear", counting)
    for fused in (True, False):
        calls.clear()
        hidden, weight, _, teacher, labels = fused_case(6, False)
        student, rows = Head(hidden, weight, None, 45), {"teacher": teacher, "labels": labels}
        if fused:
            loss = sum_token_chunks(kd_with_nll, student, rows, 14, 23)  # chunks of half that: 7
        else:
            loss = map_token_chunks(kd_with_nll, student, rows, 7).sum() / 23
        loss.backward()
        student_projections = calls.count(8)  # the teacher's head reads 6 features
        assert student_projections == (4 if fused else 7), fused  # 23 positions: 4 chunks of ≤ 7


def test_the_fused_sum_under_bfloat16_autocast_and_without_gradients():
    hidden, weight, _, teacher, labels = fused_case(7, False)
    student, rows = Head(hidden, weight, None, 45), {"teacher": teacher, "labels": labels}
    with torch.no_grad():
        plain = sum_token_chunks(kd_with_nll, student, rows, 7, 23)
    reference = map_token_chunks(kd_with_nll, student, rows, 7).sum() / 23
    torch.testing.assert_close(plain, reference.detach(), **TOLERANCE)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = sum_token_chunks(kd_with_nll, student, rows, 7, 23)
    loss.backward()
    assert hidden.grad.dtype == weight.grad.dtype == torch.float32  # float32 master weights
    torch.testing.assert_close(loss, reference.detach(), atol=0.05, rtol=0.02)  # bfloat16 logits
    expected = torch.autograd.grad(reference, weight)[0]
    assert torch.nn.functional.cosine_similarity(weight.grad.flatten(), expected.flatten(), dim=0) > 0.99


def dense_and_full_sparse_teacher(seed, n=8, vocab=29):
    teacher_logits = logits(seed, n, vocab, 3.0)
    logprobs, ids = torch.log_softmax(teacher_logits, -1).sort(-1, descending=True)
    leftover = (1 - logprobs.double().exp().sum(-1)).clamp_min(0)
    tails = [torch.full((n,), -math.inf), leftover.clamp_min(1e-30).log().float()]
    return teacher_logits, [SparseTargets(ids, logprobs, tail) for tail in tails]


@pytest.mark.parametrize(
    "name, options",
    [("forward_kl", {}), ("reverse_kl", {}), ("jsd", {"beta": 0.5}), ("tvd", {}), ("taid", {})]
    + [("forward_kl", {"temperature": 4.0}), ("jsd", {"temperature": 2.0}), ("tvd", {"temperature": 0.7})],
)
def test_sparse_top_k_with_k_equal_to_the_vocabulary_is_the_dense_loss(name, options):
    teacher_logits, (empty_tail, leftover_tail) = dense_and_full_sparse_teacher(30)
    # At τ ≠ 1 the store's tail bin is re-tempered as one token (documented approximation), so a
    # rounding leftover of 1e-8 would become (1e-8)^(1/τ): only an empty tail is exact there.
    sparse_teachers = [empty_tail, leftover_tail] if options.get("temperature", 1.0) == 1.0 else [empty_tail]
    student_logits = logits(31, 8, 29, 3.0)
    losses, grads = [], []
    for teacher in [Head(teacher_logits), *sparse_teachers]:
        student = Head(student_logits.clone().requires_grad_())
        loss = make_objective(name, options)(inputs(student, teacher))
        loss.backward()
        losses.append(loss.detach())
        grads.append(student.hidden.grad)
    for loss, grad in zip(losses[1:], grads[1:], strict=True):
        torch.testing.assert_close(loss, losses[0], **TOLERANCE)
        torch.testing.assert_close(grad, grads[0], **TOLERANCE)


@pytest.mark.parametrize("k", [1, 4, 12])
def test_top_k_forward_kl_is_the_top_k_terms_plus_one_tail_term(k):
    student_logits, teacher_logits = logits(40, 5, 31, 2.0), logits(41, 5, 31, 2.0)
    teacher_logprobs = torch.log_softmax(teacher_logits.double(), -1)
    top, ids = teacher_logprobs.topk(k, -1)
    tail = (1 - top.exp().sum(-1)).log()
    sparse = SparseTargets(ids, top.float(), tail.float())
    expected = []
    for s, t, row_ids in zip(student_logits.double(), teacher_logits.double(), ids, strict=True):
        p_s, p_t = torch.softmax(s, -1)[row_ids], torch.softmax(t, -1)[row_ids]
        top_terms = float((p_t * (p_t / p_s).log()).sum())
        mass_t, mass_s = float(p_t.sum()), float(p_s.sum())
        expected.append(top_terms + (1 - mass_t) * math.log((1 - mass_t) / (1 - mass_s)))
    expected = torch.tensor(expected, dtype=torch.float64)
    per_token = kl_teacher_student(*shared_support(student_logits, sparse))
    torch.testing.assert_close(per_token.double(), expected, **TOLERANCE)
    loss = make_objective("forward_kl")(inputs(Head(student_logits), sparse))
    torch.testing.assert_close(loss.double(), expected.mean(), **TOLERANCE)


def extreme_teachers(n, vocab):
    """One-hot-like dense logits (±1e4) and the same teacher as a sparse top-k store (with the
    log-probability of each position's label, `inputs`' arange(n) % vocab, as a served teacher sends)."""
    generator = torch.Generator().manual_seed(50)
    targets = torch.randint(0, vocab, (n,), generator=generator)
    dense = torch.full((n, vocab), -1e4)
    dense[torch.arange(n), targets] = 1e4
    logprobs, ids = torch.log_softmax(dense, -1).topk(4, -1)
    label_logprob = torch.log_softmax(dense, -1)[torch.arange(n), torch.arange(n) % vocab]
    return [Head(dense), SparseTargets(ids, logprobs, torch.full((n,), -math.inf), label_logprob)]


def teacher_objectives():
    names = [
        name
        for name, cls in OBJECTIVES.items()
        if cls.needs_teacher and not cls.needs_reference and cls.data == "completions"
    ]
    assert {
        "forward_kl",
        "reverse_kl",
        "jsd",
        "skew_forward_kl",
        "skew_reverse_kl",
        "tvd",
        "akl",
        "taid",
    } <= set(names)
    return names


@pytest.mark.parametrize("name", teacher_objectives() + ["sft"])
def test_gradients_are_finite_for_extreme_logits(name):
    n, vocab = 6, 17
    generator = torch.Generator().manual_seed(51)
    student_logits = torch.where(torch.rand(n, vocab, generator=generator) < 0.5, -1e4, 1e4)
    student_logits[0] = -1e4
    student_logits[0, 0] = 1e4  # one-hot student as well
    teachers = extreme_teachers(n, vocab) if OBJECTIVES[name].needs_teacher else [None]
    for teacher in teachers:
        for options in (
            ({}, {"temperature": 0.5}) if "temperature" in OBJECTIVES[name].model_fields else ({},)
        ):
            student = Head(student_logits.clone().requires_grad_())
            batch = inputs(student, teacher)
            batch.rewards, batch.groups = torch.tensor([1.0]), torch.tensor([0])  # GRPO-style objectives
            loss = make_objective(name, options)(batch)
            loss.backward()
            assert torch.isfinite(loss), (name, type(teacher).__name__, options)
            assert torch.isfinite(student.hidden.grad).all(), (name, type(teacher).__name__, options)


def test_taid_t_follows_the_linear_schedule_when_not_adaptive_and_stays_above_it_otherwise():
    total = 50
    losses = [3.0 * 0.97**step for step in range(total)]  # a loss that keeps falling
    linear = [0.4 + 0.6 * step / total for step in range(total + 1)]
    for adaptive in (False, True):
        taid = make_objective("taid", {"adaptive": adaptive, "alpha": 0.2})
        ts = [taid.t]
        for step in range(total):
            taid.update_t(losses[step], (step + 1) / total)
            ts.append(taid.t)
        assert ts[0] == 0.4
        assert all(b >= a for a, b in zip(ts, ts[1:], strict=False))
        assert all(t >= line - 1e-12 and t <= 1.0 for t, line in zip(ts, linear, strict=True))
        if adaptive:
            assert any(t > line + 0.05 for t, line in zip(ts, linear, strict=True))  # the adaptive push
        else:
            assert ts == pytest.approx(linear)
    capped = make_objective("taid", {"t_start": 0.2, "t_end": 0.7, "alpha": 0.5})
    for step in range(total):
        capped.update_t(losses[step], (step + 1) / total)
        assert 0.2 <= capped.t <= 0.7
    assert capped.t == 0.7


@pytest.mark.parametrize("adaptive", [False, True])
def test_taid_t_moves_once_per_optimizer_step_when_called_with_increasing_steps(adaptive):
    total, student_logits = 8, logits(60, 4, 11)
    teacher = Head(logits(61, 4, 11))
    taid = make_objective("taid", {"adaptive": adaptive, "t_start": 0.3, "t_end": 0.9, "alpha": 0.5})
    ts = []
    for step in range(total):
        for _ in range(2):  # two micro-batches per optimizer step: t must not move between them
            taid(inputs(Head(student_logits * (1 - step / total)), teacher, step=step, progress=step / total))
            ts.append(taid.t)
    assert ts[0] == ts[1] == 0.3
    assert all(ts[2 * step] == ts[2 * step + 1] for step in range(total))
    ts = ts[::2]
    linear = [0.3 + 0.6 * step / total for step in range(total)]
    assert all(b >= a for a, b in zip(ts, ts[1:], strict=False))
    assert all(line - 1e-12 <= t <= 0.9 for t, line in zip(ts, linear, strict=True))
    if not adaptive:
        assert ts == pytest.approx(linear)
    else:
        assert ts[-1] > linear[-1]


@pytest.mark.parametrize("name, options", KD_OBJECTIVES + [("sft", {})])
def test_micro_batches_with_the_global_normaliser_add_up_to_the_full_batch(name, options):
    student, teacher = projected_heads(70, n=11)
    labels = torch.arange(11) * 3 % 37
    objective = make_objective(name, options)
    if not objective.needs_teacher:
        teacher = None
    full = objective(inputs(student, teacher, labels=labels, chunk_size=4))
    full.backward()
    full_grads = student.hidden.grad.clone(), student.weight.grad.clone()
    student.hidden.grad = student.weight.grad = None
    parts = []
    for rows in (slice(0, 4), slice(4, 11)):
        part_student = Head(student.hidden[rows], student.weight)
        part_teacher = None if teacher is None else Head(teacher.hidden[rows], teacher.weight)
        part = objective(inputs(part_student, part_teacher, labels=labels[rows], normaliser=11, chunk_size=4))
        part.backward()
        parts.append(part.detach())
    torch.testing.assert_close(sum(parts), full.detach(), **TOLERANCE)
    torch.testing.assert_close(student.hidden.grad, full_grads[0], **TOLERANCE)
    torch.testing.assert_close(student.weight.grad, full_grads[1], **TOLERANCE)
