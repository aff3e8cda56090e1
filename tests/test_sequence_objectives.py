"""Masked Thought and CWT (sequence.py), and the pair objectives REDI, DPO, SimPO and AFT (preference.py)."""

import math

import pytest
import torch

from reasondistill.errors import UserError
from reasondistill.objectives import OBJECTIVES, make_objective
from reasondistill.objectives.base import IGNORE_INDEX, ObjectiveInputs
from reasondistill.objectives.heads import Head
from reasondistill.objectives.preference import aft_loss, sequence_logprobs
from reasondistill.objectives.sequence import (
    average_chunks,
    completion_nll,
    corruptible_positions,
    line_chunks,
    mask_rate,
)

VOCAB, HIDDEN = 37, 8


# --- pair batches and written-out float64 references --------------------------------------------


def pair_batch(seed=0, pairs=3, chunk_size=1024, normaliser=None, reference_seed=None):
    """P pairs as 2P sequences of random lengths (one empty-ish of length 1), a Head over their positions."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 7, (2 * pairs,), generator=generator)
    lengths[1] = 1
    total = int(lengths.sum())
    hidden = torch.randn(total, HIDDEN, generator=generator).requires_grad_()
    weight = torch.randn(VOCAB, HIDDEN, generator=generator)
    labels = torch.randint(0, VOCAB, (total,), generator=generator)
    sequence = torch.repeat_interleave(torch.arange(2 * pairs), lengths)
    reference = None
    if reference_seed is not None:
        other = torch.Generator().manual_seed(reference_seed)
        reference = Head(torch.randn(total, HIDDEN, generator=other), weight)
    return ObjectiveInputs(
        student=Head(hidden, weight),
        labels=labels,
        normaliser=pairs if normaliser is None else normaliser,
        sequence=sequence,
        num_sequences=2 * pairs,
        reference=reference,
        chunk_size=chunk_size,
    )


def loop_logprobs(head, inputs):
    """[2P] lists of Σ_t log softmax(W h_t)[y_t] and lengths, one position at a time in float64."""
    totals = [0.0] * inputs.num_sequences
    lengths = [0] * inputs.num_sequences
    for position in range(len(inputs.labels)):
        logits = head.weight.double() @ head.hidden[position].detach().double()
        row = int(inputs.sequence[position])
        totals[row] += torch.log_softmax(logits, -1)[int(inputs.labels[position])].item()
        lengths[row] += 1
    return totals, lengths


def loop_pairs(inputs, head=None):
    """[(log π(y⁺), |y⁺|, log π(y⁻), |y⁻|)] per pair, float64."""
    totals, lengths = loop_logprobs(inputs.student if head is None else head, inputs)
    half = inputs.num_sequences // 2
    return [(totals[i], lengths[i], totals[half + i], lengths[half + i]) for i in range(half)]


def log_sigmoid(x):
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


def softplus(x):
    return -log_sigmoid(-x)


def loss_of(name, inputs, **options):
    return make_objective(name, options)(inputs)


# --- sequence log-probs ---------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [2, 1024])
def test_sequence_logprobs_sum_each_sequences_token_logprobs(chunk_size):
    inputs = pair_batch(1, chunk_size=chunk_size)
    totals, tokens = sequence_logprobs(inputs)
    expected, lengths = loop_logprobs(inputs.student, inputs)
    assert totals.tolist() == pytest.approx(expected, rel=1e-5)
    assert tokens.tolist() == lengths


def test_reference_logprobs_carry_no_gradient():
    inputs = pair_batch(2, reference_seed=9)
    inputs.reference.hidden.requires_grad_()
    totals, _ = sequence_logprobs(inputs, inputs.reference)
    assert not totals.requires_grad


# --- values against the written-out formulas -------------------------------------------------------


def test_redi_is_weighted_length_normalised_logprobs_summed_over_pairs_over_the_normaliser():
    inputs = pair_batch(3, normaliser=7)
    expected = sum(-1.0 * lp / n + 0.8 * ln / m for lp, n, ln, m in loop_pairs(inputs)) / 7
    assert loss_of("redi", inputs).item() == pytest.approx(expected, rel=1e-5)


def test_redi_negative_weighting_multiplies_the_negative_term_by_exp_gamma_mean_logprob():
    inputs = pair_batch(4)
    options = {
        "chosen_coef": 0.9,
        "rejected_coef": 0.5,
        "negative_weighting": True,
        "negative_weighting_gamma": 2.0,
    }
    expected = (
        sum(-0.9 * lp / n + math.exp(2.0 * ln / m) * 0.5 * ln / m for lp, n, ln, m in loop_pairs(inputs)) / 3
    )
    assert loss_of("redi", inputs, **options).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_dpo_is_minus_log_sigmoid_of_beta_times_the_logratio_margin(label_smoothing):
    inputs = pair_batch(5, reference_seed=11)
    policy, reference = loop_pairs(inputs), loop_pairs(inputs, inputs.reference)
    expected = 0.0
    for (lp, _, ln, _), (rp, _, rn, _) in zip(policy, reference, strict=True):
        margin = 0.3 * ((lp - rp) - (ln - rn))
        expected -= (1 - label_smoothing) * log_sigmoid(margin) + label_smoothing * log_sigmoid(-margin)
    loss = loss_of("dpo", inputs, beta=0.3, label_smoothing=label_smoothing)
    assert loss.item() == pytest.approx(expected / 3, rel=1e-5)


def test_dpo_is_log_2_at_the_reference_and_falls_when_the_chosen_logprob_rises():
    inputs = pair_batch(6)
    inputs.reference = Head(inputs.student.hidden.detach().clone(), inputs.student.weight)
    objective = make_objective("dpo")
    assert objective(inputs).item() == pytest.approx(math.log(2), rel=1e-6)
    # Move the chosen rows' hidden states up their own log-prob gradient: only log π(y⁺) changes.
    totals, _ = sequence_logprobs(inputs)
    (grad,) = torch.autograd.grad(totals[:3].sum(), inputs.student.hidden)
    with torch.no_grad():
        inputs.student.hidden += 0.05 * grad
    assert (sequence_logprobs(inputs)[0][:3] > totals[:3]).all()
    assert objective(inputs).item() < math.log(2)


def test_simpo_is_minus_log_sigmoid_of_the_length_normalised_margin_minus_gamma():
    inputs = pair_batch(7)
    expected = sum(-log_sigmoid(2.5 * lp / n - 2.5 * ln / m - 0.7) for lp, n, ln, m in loop_pairs(inputs)) / 3
    assert loss_of("simpo", inputs, beta=2.5, gamma=0.7).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("constraint", ["detach", "boundary"])
def test_aft_is_positive_nll_plus_ranking_plus_constraint(constraint):
    inputs = pair_batch(8)
    expected = 0.0
    for lp, n, ln, m in loop_pairs(inputs):
        positive, negative = lp / n, ln / m
        expected += -0.5 * positive + softplus(negative - positive)
        if constraint == "boundary":
            expected += softplus(positive - 0.3 - negative)
    loss = loss_of("aft", inputs, constraint=constraint, boundary_margin=0.3, sft_weight=0.5)
    assert loss.item() == pytest.approx(expected / 3, rel=1e-5)


@pytest.mark.parametrize("name", ["redi", "dpo", "simpo", "aft"])
def test_chunked_projection_gives_the_loss_and_gradient_of_one_chunk(name):
    losses, grads = [], []
    for chunk_size in (2, 1024):
        inputs = pair_batch(9, chunk_size=chunk_size, reference_seed=12)
        loss = loss_of(name, inputs)
        losses.append(loss.item())
        grads.append(torch.autograd.grad(loss, inputs.student.hidden)[0])
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("name", ["redi", "dpo", "simpo", "aft"])
def test_micro_batches_of_pairs_with_the_global_normaliser_add_up_to_the_full_batch(name):
    full = pair_batch(10, pairs=4, reference_seed=13)
    whole = loss_of(name, full).item()
    parts = 0.0
    for pair in range(4):
        rows = (full.sequence == pair) | (full.sequence == 4 + pair)
        part = ObjectiveInputs(
            student=Head(full.student.hidden[rows], full.student.weight),
            labels=full.labels[rows],
            normaliser=4,
            sequence=(full.sequence[rows] != pair).long(),
            num_sequences=2,
            reference=Head(full.reference.hidden[rows], full.reference.weight),
        )
        parts += loss_of(name, part).item()
    assert parts == pytest.approx(whole, rel=1e-5)


def test_pair_objectives_reject_an_odd_number_of_sequences():
    inputs = pair_batch(11)
    inputs.num_sequences = 7
    with pytest.raises(ValueError, match="2P sequences"):
        loss_of("simpo", inputs)


def test_registration():
    for name in ("redi", "dpo", "simpo", "aft"):
        assert OBJECTIVES[name].data == "pairs"
    assert OBJECTIVES["dpo"].needs_reference
    assert not any(OBJECTIVES[name].needs_reference for name in ("redi", "simpo", "aft"))
    assert OBJECTIVES["masked_thought"].data == OBJECTIVES["cwt"].data == "completions"
    with pytest.raises(UserError, match="objective aft: objective_args.constraint"):
        make_objective("aft", {"constraint": "hinge"})


# --- gradient directions ---------------------------------------------------------------------------


def logprob_change_after_a_step(name, **options):
    """(Δ log π(y⁺) [P], Δ log π(y⁻) [P], hidden grad) after one small gradient step on the hidden states."""
    inputs = pair_batch(14, pairs=4, reference_seed=15)
    before, _ = sequence_logprobs(inputs)
    (grad,) = torch.autograd.grad(loss_of(name, inputs, **options), inputs.student.hidden)
    with torch.no_grad():
        inputs.student.hidden -= 1e-2 * grad
        after, _ = sequence_logprobs(inputs)
    change = after - before.detach()
    return change[:4], change[4:], grad, inputs


@pytest.mark.parametrize("name", ["redi", "dpo", "simpo"])
def test_a_step_raises_the_chosen_and_lowers_the_rejected_logprob(name):
    chosen, rejected, _, _ = logprob_change_after_a_step(name)
    assert (chosen > 0).all() and (rejected < 0).all()


def test_aft_detach_raises_positives_and_gives_negatives_exactly_no_gradient():
    chosen, rejected, grad, inputs = logprob_change_after_a_step("aft", constraint="detach")
    assert (chosen > 0).all()
    rejected_rows = inputs.sequence >= 4
    assert grad[rejected_rows].abs().max().item() == 0.0
    assert (rejected == 0).all()
    assert grad[~rejected_rows].abs().sum() > 0


def test_aft_boundary_moves_negatives_toward_half_the_margin_below_the_positive():
    chosen, rejected, grad, inputs = logprob_change_after_a_step("aft", constraint="boundary")
    assert (chosen > 0).all()
    assert grad[inputs.sequence >= 4].abs().sum() > 0
    positive = torch.tensor([-0.5, -0.5, -0.5])
    negative = torch.tensor([-3.0, -1.0, -0.7], requires_grad=True)  # below, at and above s(p) − γ/2
    (slope,) = torch.autograd.grad(aft_loss(positive, negative, "boundary", 1.0).sum(), negative)
    assert slope[0] < 0 and slope[1].item() == pytest.approx(0.0, abs=1e-7) and slope[2] > 0


# --- Masked Thought -------------------------------------------------------------------------------


class FakeTokenizer:
    """Ids 0..VOCAB−1; 0 is pad; 1 decodes to a newline, 2 to "x\\ny", the rest to letters."""

    def __init__(self, pad_token_id=0):
        self.pad_token_id = pad_token_id

    def __len__(self):
        return VOCAB

    def batch_decode(self, ids):
        texts = {1: "\n", 2: "x\ny"}
        return [texts.get(token, chr(ord("a") + token % 26)) for (token,) in ids]


def completion_batch(seed=0, rows=8, width=60, newline_ids=(1, 2)):
    """input_ids and labels [rows, width]: a prompt, a completion (ids 3.., with newlines), right padding."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (rows, width), generator=generator)
    newline = torch.rand(rows, width, generator=generator) < 0.15
    choice = torch.tensor(newline_ids)[torch.randint(len(newline_ids), (rows, width), generator=generator)]
    input_ids = torch.where(newline, choice, input_ids)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for row in range(rows):
        prompt = int(torch.randint(2, 10, (), generator=generator))
        end = int(torch.randint(prompt + 1, width + 1, (), generator=generator))
        labels[row, prompt:end] = input_ids[row, prompt:end]
        input_ids[row, end:] = 0  # padding
    return input_ids, labels


def masked_thought(**options):
    objective = make_objective("masked_thought", options)
    objective.setup(FakeTokenizer())
    return objective


def test_mask_rate_warms_up_linearly_then_stays_at_the_maximum():
    assert mask_rate(0.0, 0.2, 2 / 3) == 0
    assert mask_rate(1 / 3, 0.2, 2 / 3) == pytest.approx(0.1)
    assert mask_rate(2 / 3, 0.2, 2 / 3) == pytest.approx(0.2)
    assert mask_rate(1.0, 0.2, 2 / 3) == pytest.approx(0.2)
    assert mask_rate(0.0, 0.4, 0.0) == 0.4


def test_corruptible_positions_are_the_completion_but_its_last_token():
    labels = torch.tensor(
        [[IGNORE_INDEX, IGNORE_INDEX, 5, 6, 7, IGNORE_INDEX], [IGNORE_INDEX, 4, 5, 6, 7, 8]]
    )
    assert corruptible_positions(labels).int().tolist() == [[0, 0, 1, 1, 0, 0], [0, 1, 1, 1, 1, 0]]


def test_masked_thought_leaves_everything_alone_at_the_start_of_training():
    input_ids, labels = completion_batch(1)
    assert torch.equal(masked_thought().corrupt_inputs(input_ids, labels, 0.0), input_ids)


@pytest.mark.parametrize(("progress", "rate"), [(2 / 3, 0.2), (1.0, 0.2), (1 / 3, 0.1)])
def test_masked_thought_masks_completion_tokens_at_the_scheduled_rate_and_nothing_else(progress, rate):
    torch.manual_seed(0)
    input_ids, labels = completion_batch(2, rows=64, width=300)
    original_ids, original_labels = input_ids.clone(), labels.clone()
    corrupted = masked_thought().corrupt_inputs(input_ids, labels, progress)
    assert torch.equal(labels, original_labels) and torch.equal(input_ids, original_ids)  # nothing in place
    changed = corrupted != input_ids
    candidates = corruptible_positions(labels)
    assert not (changed & ~candidates).any()  # prompt, padding and each completion's last token untouched
    assert (corrupted[changed] == 0).all()  # the pad token
    observed = changed.sum().item() / candidates.sum().item()
    assert observed == pytest.approx(rate, abs=0.015)  # ~10k candidates: std ≈ 0.004


def test_masked_thought_random_replacement_draws_vocabulary_ids():
    torch.manual_seed(1)
    input_ids, labels = completion_batch(3, rows=64, width=300)
    corrupted = masked_thought(replacement="random", max_rate=0.4).corrupt_inputs(input_ids, labels, 1.0)
    changed = corrupted != input_ids
    candidates = corruptible_positions(labels)
    assert not (changed & ~candidates).any()
    assert corrupted.min() >= 0 and corrupted.max() < VOCAB
    # A replaced token equals the original with probability 1/V, so fewer than p of them change.
    observed = changed.sum().item() / candidates.sum().item()
    assert observed == pytest.approx(0.4 * (1 - 1 / VOCAB), abs=0.02)


def test_masked_thought_needs_a_pad_token_to_mask_with_pad():
    with pytest.raises(UserError, match="replacement: random"):
        make_objective("masked_thought").setup(FakeTokenizer(pad_token_id=None))
    make_objective("masked_thought", {"replacement": "random"}).setup(FakeTokenizer(pad_token_id=None))


def test_masked_thought_and_cwt_losses_are_the_completion_nll():
    inputs = pair_batch(16, normaliser=40)
    expected = completion_nll(inputs).item()
    assert masked_thought()(inputs).item() == pytest.approx(expected)
    assert make_objective("cwt", {"chunking": "average"})(inputs).item() == pytest.approx(expected)


# --- CWT ------------------------------------------------------------------------------------------


def test_line_chunks_group_whole_lines_to_the_minimum_and_merge_a_short_tail():
    newline = [c == "|" for c in "ab|c|defg|h|ij"]
    assert line_chunks(newline, 1) == [(0, 3), (3, 5), (5, 10), (10, 12), (12, 14)]
    assert line_chunks(newline, 3) == [(0, 3), (3, 10), (10, 14)]  # "h|" + "ij" reach 4 at the end
    assert line_chunks(newline, 5) == [(0, 5), (5, 14)]  # "h|ij" (4 tokens) joins the chunk before
    assert line_chunks(newline, 100) == [(0, 14)]
    assert line_chunks([], 4) == []


def test_average_chunks_are_near_equal_and_cover_the_completion():
    assert average_chunks(10, 4) == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert average_chunks(2, 4) == [(0, 1), (1, 2)]
    assert average_chunks(8, 1) == [(0, 8)]


def cwt(**options):
    objective = make_objective("cwt", options)
    objective.setup(FakeTokenizer())
    return objective


def kept_spans(selected, labels):
    """Per row: (indices of kept labels, indices of completion labels)."""
    return [
        (
            (selected[row] != IGNORE_INDEX).nonzero().squeeze(-1),
            (labels[row] != IGNORE_INDEX).nonzero().squeeze(-1),
        )
        for row in range(labels.shape[0])
    ]


@pytest.mark.parametrize("chunking", ["lines", "average"])
def test_cwt_keeps_exactly_one_contiguous_chunk_per_example_and_covers_the_completion_over_draws(chunking):
    torch.manual_seed(2)
    input_ids, labels = completion_batch(4, rows=6, width=80)
    objective = cwt(chunking=chunking, min_chunk_tokens=6, chunks=3)
    covered = torch.zeros_like(labels, dtype=torch.bool)
    for _ in range(150):
        selected = objective.select_labels(input_ids, labels)
        kept = selected != IGNORE_INDEX
        assert not (kept & (labels == IGNORE_INDEX)).any()  # prompt and padding stay ignored
        assert torch.equal(selected[kept], labels[kept])
        for keep, completion in kept_spans(selected, labels):
            assert len(keep) > 0
            assert torch.equal(keep, torch.arange(int(keep[0]), int(keep[-1]) + 1))  # one contiguous span
            if chunking == "average":
                assert len(keep) in (len(completion) // 3, -(-len(completion) // 3))
        covered |= kept
    assert torch.equal(covered, labels != IGNORE_INDEX)


def test_cwt_line_chunks_start_after_a_newline_and_end_at_one_or_at_the_completion_end():
    torch.manual_seed(3)
    input_ids, labels = completion_batch(5, rows=6, width=80)
    objective = cwt(min_chunk_tokens=5)
    newline = torch.isin(input_ids, torch.tensor([1, 2]))
    for _ in range(50):
        selected = objective.select_labels(input_ids, labels)
        for row, (keep, completion) in enumerate(kept_spans(selected, labels)):
            start, stop = int(keep[0]), int(keep[-1])
            assert start == int(completion[0]) or newline[row, start - 1]
            assert stop == int(completion[-1]) or newline[row, stop]
            assert len(keep) >= min(5, len(completion))


def test_cwt_leaves_rows_without_a_completion_empty():
    input_ids, labels = completion_batch(6, rows=3, width=20)
    labels[1] = IGNORE_INDEX
    selected = cwt().select_labels(input_ids, labels)
    assert (selected[1] == IGNORE_INDEX).all()


def test_cwt_finds_the_newline_tokens_of_a_real_tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    objective = make_objective("cwt")
    objective.setup(tokenizer)
    ids = torch.tensor(tokenizer.encode("Step 1: 3 + 4 = 7\nStep 2: 7 * 2 = 14\n\nSo the answer is 14."))
    newline = torch.isin(ids, objective._newline_ids)
    decoded = [tokenizer.decode([token]) for token in ids.tolist()]
    assert newline.tolist() == ["\n" in text for text in decoded]
    assert newline.sum() >= 2
