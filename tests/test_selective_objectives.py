"""TSD-KD, FIRST, AdaSPEC and CurioSFT against written-out float64 computations on small random heads."""

import math

import pytest
import torch

from reasondistill.errors import UserError
from reasondistill.objectives import OBJECTIVES, make_objective
from reasondistill.objectives.base import ObjectiveInputs
from reasondistill.objectives.heads import Head, SparseTargets
from reasondistill.objectives.selective import (
    early_entropy_positions,
    entropy_weight,
    fit_calibration_temperature,
    keep_largest_fraction,
    listmle_suffix,
    teacher_ranked_candidates,
)
from reasondistill.objectives.self_distill import adaptive_temperature, top_n_entropy

V, H = 48, 16
ROWS = [5, 7, 4, 6]  # completion tokens per sequence: N = 22


def head(n, seed, scale=1.0, grad=False):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, H, generator=generator)
    weight = torch.randn(V, H, generator=generator) * scale / math.sqrt(H)
    return Head(hidden.requires_grad_(grad), weight.requires_grad_(grad))


def logits64(h: Head) -> torch.Tensor:
    return (h.hidden.detach().double() @ h.weight.detach().double().T).detach()


def make_inputs(seed=0, normaliser=None, teacher=True, reference=False, chunk_size=1024, scale=3.0):
    n = sum(ROWS)
    sequence = torch.cat([torch.full((length,), row) for row, length in enumerate(ROWS)])
    labels = torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(seed + 7))
    return ObjectiveInputs(
        student=head(n, seed, scale, grad=True),
        labels=labels,
        normaliser=n if normaliser is None else normaliser,
        sequence=sequence,
        num_sequences=len(ROWS),
        teacher=head(n, seed + 1, 2 * scale) if teacher else None,
        reference=head(n, seed + 2, scale) if reference else None,
        chunk_size=chunk_size,
    )


def log_softmax(row):
    return row - torch.logsumexp(row, 0)


def kl(p_log, q_log):
    """KL(p ‖ q) of two float64 log-probability vectors, term by term."""
    return sum(math.exp(a) * (a - b) for a, b in zip(p_log.tolist(), q_log.tolist(), strict=True) if a > -700)


def h(logp):
    return -sum(math.exp(a) * a for a in logp.tolist())


def sparse_from_dense(logits: torch.Tensor, k: int, generator=None) -> SparseTargets:
    """The top-k of dense logits as a store would hold them (shuffled order, exact tail)."""
    logprobs = torch.log_softmax(logits.double(), -1)
    top, ids = logprobs.topk(k, -1)
    if generator is not None:
        perm = torch.stack([torch.randperm(k, generator=generator) for _ in range(len(ids))])
        top, ids = top.gather(-1, perm), ids.gather(-1, perm)
    tail = torch.logsumexp(logprobs.scatter(-1, ids, -math.inf), -1)
    return SparseTargets(ids, top.float(), tail.float())


# --------------------------------------------------------------------------------------------- TSD-KD


def reference_tsd_kd(inputs, beta=0.9, tau=1.0, q=0.1, k=10, alpha=0.1, entropy_weight=1.0, share=0.1):
    zs, zt = logits64(inputs.student) / tau, logits64(inputs.teacher) / tau
    n = len(zs)
    direct, entropies, ranking = 0.0, [], []
    for i in range(n):
        ls, lt = log_softmax(zs[i]), log_softmax(zt[i])
        mix = torch.log(beta * lt.exp() + (1 - beta) * ls.exp())
        jsd = beta * kl(lt, mix) + (1 - beta) * kl(ls, mix)
        weight = 1 / (1 + math.exp(-(h(ls) - h(lt))))
        direct += weight * jsd
        entropies.append(h(ls))
        candidates = sorted(range(V), key=lambda v: -zs[i, v].item())[:k]
        s = [zs[i, v].item() for v in sorted(candidates, key=lambda v: -zt[i, v].item())]
        ranking.append(-sum(s[a] - math.log(sum(math.exp(x) for x in s[a:])) for a in range(k)))
    threshold = torch.quantile(torch.tensor(entropies, dtype=torch.float64), q).item()
    selected = [e for e in entropies if e >= threshold]
    keep, start = [], 0
    for length in ROWS:
        row = entropies[start : start + length]
        cumulative = 0.0
        for j, e in enumerate(row):
            if j == 0 or cumulative < share * sum(row):
                keep.append(start + j)
            cumulative += e
        start += length
    part = n / float(inputs.normaliser)
    return (
        direct / float(inputs.normaliser)
        + entropy_weight * part * sum(selected) / len(selected)
        + alpha * part * sum(ranking[i] for i in keep) / len(keep)
    )


@pytest.mark.parametrize(
    "options",
    [
        {},
        {
            "beta": 0.5,
            "temperature": 2.0,
            "entropy_quantile": 0.3,
            "top_k": 5,
            "alpha": 1.0,
            "entropy_weight": 0.5,
        },
    ],
)
def test_tsd_kd_equals_the_written_out_objective(options):
    inputs = make_inputs(0, normaliser=3 * sum(ROWS))  # the micro-batch is a third of the global batch
    loss = make_objective("tsd_kd", options)(inputs)
    names = {"temperature": "tau", "entropy_quantile": "q", "top_k": "k"}
    expected = reference_tsd_kd(inputs, **{names.get(key, key): value for key, value in options.items()})
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert torch.isfinite(inputs.student.hidden.grad).all()


def test_tsd_kd_weight_is_above_half_where_the_student_is_less_certain_than_the_teacher():
    flat = torch.log_softmax(torch.randn(4, V) * 0.1, -1)
    sharp = torch.log_softmax(torch.randn(4, V) * 5, -1)
    assert (entropy_weight(flat, sharp) > 0.5).all()
    assert (entropy_weight(sharp, flat) < 0.5).all()
    assert entropy_weight(flat, flat) == pytest.approx(0.5)
    assert not entropy_weight(flat.requires_grad_(), sharp).requires_grad


def test_listmle_is_lower_when_the_student_already_follows_the_teacher_order():
    student = torch.randn(6, V)
    agrees = listmle_suffix(teacher_ranked_candidates(student, student * 2, 10))
    reversed_ = listmle_suffix(teacher_ranked_candidates(student, -student, 10))
    assert (agrees < reversed_).all()
    # suffix sums: the loss of a list is −log of its Plackett-Luce probability, ≥ 0
    assert (agrees >= 0).all()
    two = torch.tensor([[2.0, 0.0]])
    assert listmle_suffix(two).item() == pytest.approx(-math.log(math.exp(2) / (math.exp(2) + 1)), rel=1e-6)


def test_sparse_ranking_puts_candidates_outside_the_teacher_top_k_last_in_student_order():
    student = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0, 0.0]])
    teacher = SparseTargets(torch.tensor([[4, 2]]), torch.tensor([[-0.5, -1.0]]), torch.tensor([-1.5]))
    ranked = teacher_ranked_candidates(student, teacher, 5)
    assert ranked.tolist() == [[1.0, 3.0, 5.0, 4.0, 2.0]]  # ids 4, 2 (teacher order), then 0, 1, 3


def test_tsd_kd_with_full_sparse_targets_equals_the_dense_teacher():
    inputs = make_inputs(1)
    dense = make_objective("tsd_kd", {"alpha": 1.0})(inputs).item()
    inputs.teacher = sparse_from_dense(logits64(inputs.teacher), V, torch.Generator().manual_seed(0))
    assert make_objective("tsd_kd", {"alpha": 1.0})(inputs).item() == pytest.approx(dense, rel=1e-5)


def test_tsd_kd_entropy_term_is_the_mean_of_the_completion_tokens_above_the_quantile():
    inputs = make_inputs(2)
    inputs.teacher = Head(inputs.student.hidden.detach(), inputs.student.weight.detach())  # JSD = 0
    loss = make_objective("tsd_kd", {"alpha": 0.0, "entropy_quantile": 0.25})(inputs)
    entropies = torch.tensor([h(log_softmax(row)) for row in logits64(inputs.student)])
    selected = entropies[entropies >= torch.quantile(entropies, 0.25)]
    assert len(selected) == sum(ROWS) - math.ceil((sum(ROWS) - 1) * 0.25)
    assert loss.item() == pytest.approx(selected.mean().item(), rel=1e-5)
    loss.backward()  # the regulariser trains the student
    assert inputs.student.hidden.grad.abs().sum() > 0


def test_ranking_positions_are_chosen_per_sequence_including_the_crossing_one():
    entropies = torch.tensor([1.0, 1.0, 8.0, 5.0, 5.0, 0.0, 0.0])
    sequence = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    assert early_entropy_positions(entropies, sequence, 3, 0.1).tolist() == [1, 0, 0, 1, 0, 1, 0]
    assert early_entropy_positions(entropies, sequence, 3, 0.5).tolist() == [1, 1, 1, 1, 0, 1, 0]
    # rows need not be contiguous: positions of a row are in order
    interleaved = torch.tensor([0, 1, 0, 1, 0, 2, 2])
    values = torch.tensor([1.0, 5.0, 1.0, 5.0, 8.0, 0.0, 0.0])
    assert early_entropy_positions(values, interleaved, 3, 0.5).tolist() == [1, 1, 1, 0, 1, 1, 0]


# --------------------------------------------------------------------------------------------- FIRST


def reference_first(inputs, k=5, tail=False, epsilon=1e-6, temperature=1.0):
    zs, zt = logits64(inputs.student), logits64(inputs.teacher)
    total = 0.0
    for i in range(len(zs)):
        ps, pt = log_softmax(zs[i]).exp(), log_softmax(zt[i]).exp()
        ids = sorted(range(V), key=lambda v: -pt[v].item())[:k]
        if tail:
            teacher = [pt[v].item() for v in ids] + [max(1 - sum(pt[v].item() for v in ids), math.exp(-25))]
            student = [ps[v].item() for v in ids] + [1 - sum(ps[v].item() for v in ids)]
        else:
            teacher = [(pt[v].item() + epsilon) / sum(pt[u].item() + epsilon for u in ids) for v in ids]
            student = [(ps[v].item() + epsilon) / sum(ps[u].item() + epsilon for u in ids) for v in ids]
        tempered = [math.log(p) / temperature for p in teacher]
        teacher = log_softmax(torch.tensor(tempered, dtype=torch.float64))
        total += kl(teacher, torch.tensor(student, dtype=torch.float64).log())
    return total / float(inputs.normaliser)


@pytest.mark.parametrize("tail", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 1.7])
def test_first_equals_the_written_out_objective(tail, temperature):
    inputs = make_inputs(3)
    options = {"tail": tail, "teacher_temperature": temperature}
    loss = make_objective("first", options)(inputs)
    assert loss.item() == pytest.approx(reference_first(inputs, 5, tail, 1e-6, temperature), rel=1e-5)
    loss.backward()
    assert torch.isfinite(inputs.student.hidden.grad).all()


def test_first_tail_version_over_the_whole_vocabulary_is_the_forward_kl():
    inputs = make_inputs(4)
    loss = make_objective("first", {"k": V, "tail": True})(inputs)
    assert loss.item() == pytest.approx(make_objective("forward_kl")(inputs).item(), rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("tail", [False, True])
def test_first_takes_the_k_most_likely_stored_tokens_of_sparse_targets(tail):
    inputs = make_inputs(5)
    dense = make_objective("first", {"tail": tail})(inputs).item()
    inputs.teacher = sparse_from_dense(logits64(inputs.teacher), 9, torch.Generator().manual_seed(1))
    assert make_objective("first", {"tail": tail})(inputs).item() == pytest.approx(dense, rel=1e-5)


@pytest.mark.parametrize(("sharpness", "side"), [(3.0, "above"), (1 / 3, "below")])
def test_calibration_temperature_softens_overconfident_and_sharpens_underconfident_teachers(sharpness, side):
    generator = torch.Generator().manual_seed(0)
    n, k = 4000, 5
    true_logits = torch.randn(n, k + 1, generator=generator, dtype=torch.float64) * 1.5
    labels = torch.multinomial(torch.softmax(true_logits, -1), 1, generator=generator)[:, 0]
    reported = torch.log_softmax(true_logits * sharpness, -1)  # sharper (over-) or flatter (under-confident)
    label_index = torch.where(labels == k, -1, labels)
    fitted = fit_calibration_temperature(reported[:, :k].float(), reported[:, k].float(), label_index)
    assert (fitted > 1.5) if side == "above" else (fitted < 0.7)
    assert fitted == pytest.approx(sharpness, rel=0.15)
    calibrated = fit_calibration_temperature(
        torch.log_softmax(true_logits, -1)[:, :k], reported[:, k] * 0, label_index
    )
    assert 0.1 < calibrated < 20


def test_calibration_temperature_is_one_for_a_calibrated_teacher():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(8000, 6, generator=generator, dtype=torch.float64) * 1.5
    labels = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)[:, 0]
    logprobs = torch.log_softmax(logits, -1)
    fitted = fit_calibration_temperature(
        logprobs[:, :5], logprobs[:, 5], torch.where(labels == 5, -1, labels)
    )
    assert fitted == pytest.approx(1.0, abs=0.1)


# --------------------------------------------------------------------------------------------- AdaSPEC


def test_adaspec_equals_the_written_out_objective():
    inputs = make_inputs(6, reference=True, normaliser=50)
    assert OBJECTIVES["adaspec"].needs_reference and OBJECTIVES["adaspec"].needs_teacher
    loss = make_objective("adaspec", {"keep_fraction": 0.4})(inputs)
    zs, zt, zr = logits64(inputs.student), logits64(inputs.teacher), logits64(inputs.reference)
    draft = [kl(log_softmax(zt[i]), log_softmax(zs[i])) for i in range(len(zs))]
    ref = [kl(log_softmax(zt[i]), log_softmax(zr[i])) for i in range(len(zs))]
    delta = torch.tensor([d - r for d, r in zip(draft, ref, strict=True)], dtype=torch.float64)
    threshold = torch.quantile(delta, 0.6).item()
    kept = [d for d, x in zip(draft, delta.tolist(), strict=True) if x >= threshold]
    assert len(kept) == sum(ROWS) - math.ceil((sum(ROWS) - 1) * 0.6)
    assert loss.item() == pytest.approx(sum(kept) / 50, rel=1e-5)


@pytest.mark.parametrize("n", [1, 2, 10, 23, 100])
@pytest.mark.parametrize("keep", [0.1, 0.4, 0.5, 1.0])
def test_adaspec_keeps_the_quantile_consistent_share_of_the_largest_gaps(n, keep):
    delta = torch.randn(n, generator=torch.Generator().manual_seed(n))
    kept = keep_largest_fraction(delta, keep)
    assert kept.sum().item() == n - math.ceil(round((n - 1) * (1 - keep), 9))
    assert delta[kept].min() >= delta[~kept].max() if (~kept).any() else kept.all()


def test_adaspec_drops_tokens_that_the_reference_finds_hard_too():
    inputs = make_inputs(7, reference=True)
    n = sum(ROWS)
    hard = torch.arange(n) % 2 == 0  # the reference is as far from the teacher as the student here
    reference_hidden = torch.where(hard[:, None], inputs.student.hidden.detach(), inputs.teacher.hidden)
    reference_weight = inputs.student.weight.detach()
    inputs.teacher = Head(inputs.teacher.hidden, reference_weight)  # same head: easy tokens are matched
    inputs.reference = Head(reference_hidden, reference_weight)
    loss = make_objective("adaspec", {"keep_fraction": 0.5})(inputs)
    loss.backward()
    grad = inputs.student.hidden.grad.abs().sum(-1)
    assert (grad[hard] == 0).all() and (grad[~hard] > 0).all()


def test_adaspec_without_a_reference_is_a_user_error():
    with pytest.raises(UserError, match="reference"):
        make_objective("adaspec")(make_inputs(0))


# --------------------------------------------------------------------------------------------- CurioSFT


def reference_tau(z, top_n=512, tau_min=1.1, tau_max=1.5):
    """CurioSFT's τ for one row, by plain bisection in float64."""
    top = sorted(z.tolist(), reverse=True)[:top_n]

    def entropy_at(t):
        return h(log_softmax(torch.tensor(top, dtype=torch.float64) / t))

    if h(log_softmax(z)) <= 0.03:
        return tau_min
    target = entropy_at(1.0) + 0.5 / (1 + math.exp(-2 * (entropy_at(1.0) - 1.2)))
    if target <= entropy_at(tau_min):
        return tau_min
    if target >= entropy_at(tau_max):
        return tau_max
    lo, hi = tau_min, tau_max
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if entropy_at(mid) < target else (lo, mid)
    return (lo + hi) / 2


@pytest.mark.parametrize("top_n", [512, 12])
def test_adaptive_temperature_solves_for_the_target_entropy_within_its_bounds(top_n):
    generator = torch.Generator().manual_seed(8)
    scales = torch.tensor([0.1, 0.5, 1.0, 2.0, 4.0, 8.0, 30.0, 300.0]).repeat_interleave(4)
    logits = torch.randn(len(scales), V, generator=generator) * scales[:, None]
    tau = adaptive_temperature(logits, top_n=top_n)
    assert ((tau >= 1.1) & (tau <= 1.5)).all()
    expected = torch.tensor([reference_tau(row.double(), top_n) for row in logits], dtype=torch.float32)
    assert torch.allclose(tau, expected, atol=2e-5)
    assert (tau[-4:] == 1.1).all()  # near-deterministic rows get τ_min
    h_now = top_n_entropy(logits, 1.0, top_n)
    target = h_now + 0.5 * torch.sigmoid(2 * (h_now - 1.2))
    interior = (tau > 1.1 + 1e-4) & (tau < 1.5 - 1e-4)
    assert interior.sum() >= 4
    achieved = top_n_entropy(logits, tau, top_n)
    assert torch.allclose(achieved[interior], target[interior], atol=1e-4)


def reference_curio(inputs, alpha=1.0):
    zs = logits64(inputs.student)
    total = 0.0
    for i, label in enumerate(inputs.labels.tolist()):
        logp = log_softmax(zs[i])[label].item()
        heated = log_softmax(zs[i] / reference_tau(zs[i]))[label].item()
        total += -logp + alpha * 0.5 * (logp - heated) ** 2
    return total / float(inputs.normaliser)


def test_curio_sft_equals_the_written_out_objective_and_is_the_nll_without_self_distillation():
    inputs = make_inputs(9, teacher=False, normaliser=40)
    assert not OBJECTIVES["curio_sft"].needs_teacher
    assert make_objective("curio_sft")(inputs).item() == pytest.approx(reference_curio(inputs), rel=1e-5)
    assert make_objective("curio_sft", {"alpha": 0.0})(inputs).item() == pytest.approx(
        make_objective("sft")(inputs).item(), rel=1e-6
    )
    assert make_objective("curio_sft", {"alpha": 0.0})(inputs).item() == pytest.approx(
        reference_curio(inputs, 0.0), rel=1e-5
    )


def test_curio_sft_gradients_are_finite_for_extreme_logits():
    inputs = make_inputs(10, teacher=False, scale=3000.0)
    loss = make_objective("curio_sft")(inputs)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(inputs.student.hidden.grad).all()
    assert torch.isfinite(inputs.student.weight.grad).all()


# --------------------------------------------------------------------------------------------- all four


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("tsd_kd", {"alpha": 1.0}),
        ("first", {}),
        ("first", {"tail": True}),
        ("adaspec", {}),
        ("curio_sft", {}),
    ],
)
def test_chunked_computation_equals_one_chunk(name, options):
    values, grads = [], []
    for chunk_size in (1024, 5):
        inputs = make_inputs(11, reference=True, chunk_size=chunk_size)
        loss = make_objective(name, options)(inputs)
        loss.backward()
        values.append(loss.item())
        grads.append(inputs.student.hidden.grad)
    assert values[1] == pytest.approx(values[0], rel=1e-5)
    assert torch.allclose(grads[1], grads[0], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("name", ["tsd_kd", "first", "adaspec", "curio_sft"])
def test_an_empty_micro_batch_gives_zero(name):
    inputs = make_inputs(12, reference=True)
    empty = Head(inputs.student.hidden[:0], inputs.student.weight)
    teacher = Head(inputs.teacher.hidden[:0], inputs.teacher.weight)
    reference = Head(inputs.reference.hidden[:0], inputs.reference.weight)
    inputs = ObjectiveInputs(empty, inputs.labels[:0], 10, inputs.sequence[:0], 0, teacher, reference)
    assert make_objective(name)(inputs).item() == 0
