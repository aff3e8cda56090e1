import pytest
import torch

from reasondistill.errors import UserError
from reasondistill.objectives import OBJECTIVES, make_objective
from reasondistill.objectives.base import IGNORE_INDEX, ObjectiveInputs
from reasondistill.objectives.heads import Head


def reference_nll(logits, labels):
    """Σ over completion tokens of −log softmax(logits_t)[y_{t+1}], written out position by position."""
    total = 0.0
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            target = labels[b, t + 1].item()
            if target != IGNORE_INDEX:
                total -= torch.log_softmax(logits[b, t].double(), -1)[target].item()
    return total


def batch(seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 7, 11, generator=generator)
    labels = torch.randint(0, 11, (3, 7), generator=generator)
    labels[:, :3] = IGNORE_INDEX  # prompt
    labels[1, 5:] = IGNORE_INDEX  # padding
    return logits, labels


def sft_loss(logits, labels, normaliser, chunk_size=1024):
    """The SFT objective on a [B, S, V] batch, reduced to completion positions as the trainer does."""
    predicts = labels[:, 1:] != IGNORE_INDEX
    inputs = ObjectiveInputs(
        student=Head(logits[:, :-1][predicts]),
        labels=labels[:, 1:][predicts],
        normaliser=normaliser,
        sequence=predicts.nonzero()[:, 0],
        num_sequences=len(labels),
        chunk_size=chunk_size,
    )
    return make_objective("sft")(inputs)


def test_sft_loss_is_the_completion_nll_divided_by_the_global_token_count():
    logits, labels = batch()
    tokens = labels[:, 1:].ne(IGNORE_INDEX).sum()
    loss = sft_loss(logits, labels, tokens, chunk_size=4)
    assert loss.item() == pytest.approx(reference_nll(logits, labels) / tokens.item(), rel=1e-5)


def test_micro_batches_with_the_global_normaliser_add_up_to_the_full_batch():
    logits, labels = batch(1)
    tokens = labels[:, 1:].ne(IGNORE_INDEX).sum()
    full = sft_loss(logits, labels, tokens)
    parts = sum(sft_loss(logits[i : i + 1], labels[i : i + 1], tokens) for i in range(3))
    assert parts.item() == pytest.approx(full.item(), rel=1e-6)


def test_prompt_positions_do_not_contribute():
    logits, labels = batch(2)
    changed = logits.clone()
    changed[:, :2] += 100 * torch.randn_like(changed[:, :2])  # these positions predict prompt tokens only
    tokens = labels[:, 1:].ne(IGNORE_INDEX).sum()
    assert sft_loss(changed, labels, tokens).item() == pytest.approx(sft_loss(logits, labels, tokens).item())


def test_registry():
    assert not OBJECTIVES["sft"].needs_teacher and OBJECTIVES["sft"].summary().startswith("SFT")
    assert (
        OBJECTIVES["forward_kl"].needs_teacher and "KL(teacher‖student)" in OBJECTIVES["forward_kl"].summary()
    )
    assert make_objective("jsd", {"beta": 0.9}).beta == 0.9
    with pytest.raises(UserError, match="unknown objective 'kd'; known objectives: .*forward_kl.*sft"):
        make_objective("kd")
    with pytest.raises(UserError, match=r"objective jsd: objective_args.beta: .*less than or equal to 1"):
        make_objective("jsd", {"beta": 2})
    with pytest.raises(UserError, match=r"objective jsd: objective_args.bta: Extra inputs"):
        make_objective("jsd", {"bta": 0.5})
