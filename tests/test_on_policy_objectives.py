"""Policy-gradient objectives and the on-policy batch builder, against their formulas (no trained models)."""

import math

import pytest
import torch
from transformers import AutoTokenizer

from reasondistill.errors import UserError
from reasondistill.generate.logprobs import TokenLogprobs
from reasondistill.objectives import make_objective
from reasondistill.objectives.base import ObjectiveInputs
from reasondistill.objectives.divergences import kl_student_teacher
from reasondistill.objectives.heads import Head, SparseTargets
from reasondistill.objectives.policy import group_advantages, sampled_reverse_kl
from reasondistill.records import TrainingExample
from reasondistill.tasks import TASKS
from reasondistill.train.on_policy import Sample, StepBatches, prompt_rows
from reasondistill.train.on_policy_options import OnPolicyOptions, on_policy_problem

V = 7


def one_position(student_logits: torch.Tensor, label: int, teacher, **extra) -> ObjectiveInputs:
    """Inputs of a single completion position whose student logits are `student_logits` (given as a Head)."""
    return ObjectiveInputs(
        student=Head(student_logits[None]),
        labels=torch.tensor([label]),
        normaliser=1,
        sequence=torch.tensor([0]),
        num_sequences=1,
        teacher=teacher,
        **extra,
    )


def expected_gradient(objective, student_logits, teacher_logits, **extra) -> torch.Tensor:
    """Σ_y q(y)·∇loss(y): the gradient the objective follows in expectation over the student's samples."""
    q = torch.softmax(student_logits, -1).detach()
    total = torch.zeros(V)
    for y in range(V):
        logits = student_logits.detach().clone().requires_grad_(True)
        objective(one_position(logits, y, Head(teacher_logits[None]), **extra)).backward()
        total += q[y] * logits.grad
    return total


def reverse_kl_gradient(student_logits, teacher_logits) -> torch.Tensor:
    logits = student_logits.detach().clone().requires_grad_(True)
    kl_student_teacher(torch.log_softmax(logits, -1), torch.log_softmax(teacher_logits, -1)).sum().backward()
    return logits.grad


@pytest.fixture
def logits():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(V, generator=generator) * 2, torch.randn(V, generator=generator) * 2


def test_reverse_kl_policy_gradient_follows_the_reverse_kl_gradient_in_expectation(logits):
    student, teacher = logits
    objective = make_objective("reverse_kl_pg")
    torch.testing.assert_close(
        expected_gradient(objective, student, teacher),
        reverse_kl_gradient(student, teacher),
        atol=1e-6,
        rtol=1e-5,
    )


def test_reverse_kl_policy_gradient_is_exactly_zero_when_teacher_is_student(logits):
    student, _ = logits
    for y in range(V):
        student_logits = student.clone().requires_grad_(True)
        loss = make_objective("reverse_kl_pg")(one_position(student_logits, y, Head(student[None].clone())))
        loss.backward()
        assert torch.count_nonzero(student_logits.grad) == 0


def test_analytic_reverse_kl_has_zero_gradient_when_teacher_is_student(logits):
    student, _ = logits
    student_logits = student.clone().requires_grad_(True)
    make_objective("reverse_kl")(one_position(student_logits, 0, Head(student[None].clone()))).backward()
    assert student_logits.grad.abs().max() < 1e-7


def test_policy_gradient_reads_a_served_teachers_sampled_token_logprob(logits):
    """A served teacher's top-k need not hold the sampled token: its own log-probability is used."""
    student, teacher = logits
    teacher_logprobs = torch.log_softmax(teacher, -1)
    y = int(teacher_logprobs.argmin())  # surely outside a top-2
    top = teacher_logprobs.topk(2)
    served = SparseTargets(
        top.indices[None], top.values[None], torch.tensor([-1.0]), teacher_logprobs[y : y + 1]
    )
    dense = make_objective("reverse_kl_pg")(one_position(student, y, Head(teacher[None])))
    sparse = make_objective("reverse_kl_pg")(one_position(student, y, served))
    torch.testing.assert_close(dense, sparse)


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_k1_and_k3_are_unbiased_estimates_of_the_reverse_kl(logits, estimator):
    student, teacher = logits
    q, p = torch.log_softmax(student, -1), torch.log_softmax(teacher, -1)
    expectation = (q.exp() * sampled_reverse_kl(q, p, estimator)).sum()
    torch.testing.assert_close(expectation, kl_student_teacher(q, p))


def test_kl_estimators_match_their_formulas():
    d = torch.tensor([-2.0, 0.0, 0.5, 30.0])
    student, teacher = d, torch.zeros(4)
    torch.testing.assert_close(sampled_reverse_kl(student, teacher, "k1"), d)
    torch.testing.assert_close(sampled_reverse_kl(student, teacher, "k2"), 0.5 * d**2)
    clamped = d.clamp(-10, 10)
    torch.testing.assert_close(sampled_reverse_kl(student, teacher, "k3"), torch.exp(-clamped) + clamped - 1)


def test_kdrl_k2_term_follows_the_reverse_kl_gradient_and_scales_with_beta(logits):
    """With equal rewards the GRPO advantage is 0 and only β·k2 remains: E[∇] = β·∇KL(q‖p_T)."""
    student, teacher = logits
    kdrl = make_objective("kdrl", {"kd_coef": 0.3, "kd_coef_end": None, "kl_estimator": "k2"})
    extra = {"rewards": torch.tensor([1.0]), "groups": torch.tensor([0])}
    torch.testing.assert_close(
        expected_gradient(kdrl, student, teacher, **extra),
        0.3 * reverse_kl_gradient(student, teacher),
        atol=1e-6,
        rtol=1e-5,
    )


def test_kdrl_on_incorrect_samples_only_leaves_correct_ones_to_grpo(logits):
    student, teacher = logits
    kdrl = make_objective("kdrl", {"kd_coef": 0.3, "kd_coef_end": None, "kd_on": "incorrect"})
    correct = {"rewards": torch.tensor([1.0]), "groups": torch.tensor([0])}
    assert expected_gradient(kdrl, student, teacher, **correct).abs().max() == 0
    wrong = {"rewards": torch.tensor([0.0]), "groups": torch.tensor([0])}
    assert expected_gradient(kdrl, student, teacher, **wrong).abs().max() > 1e-3


def test_kd_coefficient_schedules_run_from_start_to_end():
    linear = make_objective("kdrl", {"kd_coef": 5e-3, "kd_coef_end": 1e-3})
    cosine = make_objective("kdrl", {"kd_coef": 5e-3, "kd_coef_end": 1e-3, "kd_schedule": "cosine"})
    for schedule in (linear, cosine):
        assert schedule.kd_weight(0.0) == pytest.approx(5e-3) and schedule.kd_weight(1.0) == pytest.approx(
            1e-3
        )
    assert linear.kd_weight(0.5) == pytest.approx(3e-3) and cosine.kd_weight(0.5) == pytest.approx(3e-3)
    assert cosine.kd_weight(0.1) > linear.kd_weight(0.1)  # cosine leaves the start slowly


def test_group_advantages_normalise_within_each_prompts_samples():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    scaled = group_advantages(rewards, groups, scale=True)
    first = rewards[:4] - 0.25
    torch.testing.assert_close(scaled[:4], first / (first.std() + 1e-4))
    assert torch.equal(scaled[4:], torch.zeros(4))  # all alike: nothing to learn from the group
    torch.testing.assert_close(group_advantages(rewards, groups, scale=False)[:4], first)


def grad_log_prob(logits: torch.Tensor, label: int) -> torch.Tensor:
    leaf = logits.detach().clone().requires_grad_(True)
    torch.log_softmax(leaf, -1)[label].backward()
    return leaf.grad


def test_grpo_gradient_is_minus_advantage_times_grad_log_prob(logits):
    student, _ = logits
    hidden = torch.stack([student, student]).requires_grad_(True)
    inputs = ObjectiveInputs(
        student=Head(hidden),
        labels=torch.tensor([2, 5]),
        normaliser=2,
        sequence=torch.tensor([0, 1]),
        num_sequences=2,
        rewards=torch.tensor([1.0, 0.0]),
        groups=torch.tensor([0, 0]),
    )
    loss = make_objective("grpo")(inputs)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)  # a group's advantages sum to 0 and the ratio is 1
    loss.backward()
    advantage = 0.5 / (math.sqrt(0.5) + 1e-4)  # (1 − mean) / std of the rewards [1, 0]
    torch.testing.assert_close(hidden.grad[0], -advantage * grad_log_prob(student, 2) / 2)
    torch.testing.assert_close(hidden.grad[1], advantage * grad_log_prob(student, 5) / 2)


# ---- options and the batch builder ------------------------------------------------------------


def test_on_policy_needs_are_checked_with_one_line_reasons():
    def problem(name, options=None, args=None, teacher_is_student=False):
        return on_policy_problem(make_objective(name, args), options, teacher_is_student)

    assert "set on_policy" in problem("reverse_kl_pg")
    assert "fraction 1" in problem("grpo", OnPolicyOptions(fraction=0.5, samples_per_prompt=4))
    assert "samples_per_prompt" in problem("grpo", OnPolicyOptions())
    assert "pairs" in problem("dpo", OnPolicyOptions())
    assert "needs on_policy" in problem("forward_kl", teacher_is_student=True)
    assert "{solution}" in problem("forward_kl", OnPolicyOptions(teacher_context="{problem} only"))
    assert "has no teacher" in problem("sft", OnPolicyOptions(teacher_context="opsd"))
    assert problem("jsd", OnPolicyOptions(fraction=0.5, teacher_context="opsd")) is None
    assert problem("kdrl", OnPolicyOptions(samples_per_prompt=4)) is None


@pytest.fixture(scope="module")
def rows(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    problems = TASKS["arithmetic"].sample("train", 3, seed=1, difficulties=(2,))
    examples = [
        TrainingExample(problem_id=p.id, task=p.task, messages=p.messages, completion=p.solution)
        for p in problems
    ]
    options = OnPolicyOptions(teacher_context="Solution: {solution}\n{problem}")
    return (
        tokenizer,
        problems,
        prompt_rows(tokenizer, examples, {p.id: p for p in problems}, options, False, "t"),
    )


def test_privileged_teacher_reads_the_same_completion_tokens_at_paired_positions(rows):
    tokenizer, problems, prompt_rows_ = rows
    max_length = max(len(r.teacher_prompt_ids) for r in prompt_rows_) + 12  # cuts every completion
    builder = StepBatches(
        prompt_rows_, OnPolicyOptions(teacher_context="x"), tokenizer, max_length, 0, lambda task: None
    )
    samples = [
        Sample(r, i, r.completion_ids, r.example.completion, "stop", reward=float(i != 1))
        for i, r in enumerate(prompt_rows_)
    ]
    batch = builder._batch(samples, None)
    for i, row in enumerate(prompt_rows_):
        assert row.teacher_prompt_ids != row.prompt_ids and len(row.teacher_prompt_ids) > len(row.prompt_ids)
        student = batch["labels"][i][batch["labels"][i] != -100].tolist()
        teacher = batch["teacher_labels"][i][batch["teacher_labels"][i] != -100].tolist()
        assert student == teacher == row.completion_ids[: max_length - len(row.teacher_prompt_ids)]
        assert batch["teacher_attention_mask"][i].sum() <= max_length
        assert problems[i].solution in tokenizer.decode(row.teacher_prompt_ids)


def test_the_quality_gate_drops_rejected_samples_from_the_loss_only(rows):
    tokenizer, _, prompt_rows_ = rows
    builder = StepBatches(prompt_rows_, OnPolicyOptions(gate="correct"), tokenizer, 512, 0, lambda task: None)
    samples = [
        Sample(r, i, r.completion_ids, "", "stop", reward=float(i != 1)) for i, r in enumerate(prompt_rows_)
    ]
    batch = builder._batch(samples, None)
    kept = (batch["labels"] != -100).any(-1).tolist()
    assert kept == [True, False, True]
    assert batch["attention_mask"][1].sum() == len(prompt_rows_[1].prompt_ids) + len(
        prompt_rows_[1].completion_ids
    )


def test_served_teacher_rows_sit_on_the_sampled_tokens(rows):
    tokenizer, _, prompt_rows_ = rows
    builder = StepBatches(prompt_rows_, OnPolicyOptions(), tokenizer, 512, 0, lambda task: None)
    samples = [Sample(r, i, r.completion_ids, "", "stop") for i, r in enumerate(prompt_rows_)]
    scored = [
        TokenLogprobs.build(
            s.token_ids,
            [-0.5] * len(s.token_ids),
            [[t, 0] for t in s.token_ids],
            [[-0.5, -2.0]] * len(s.token_ids),
        )
        for s in samples
    ]
    batch = builder._batch(samples, scored)
    completion = batch["labels"] != -100
    assert torch.equal(batch["teacher_topk_ids"][..., 0][completion], batch["input_ids"][completion])
    assert torch.all(batch["teacher_token_logprob"][completion] == -0.5)
    assert torch.all(batch["teacher_token_logprob"][~completion] == 0)


def test_prompt_rows_refuse_unknown_problems_and_missing_solutions(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    problem = TASKS["arithmetic"].sample("train", 1, seed=1)[0]
    example = TrainingExample(problem_id="nope", task="arithmetic", messages=problem.messages, completion="x")
    with pytest.raises(UserError, match="example 0: problem_id 'nope' is not a known problem"):
        prompt_rows(tokenizer, [example], {problem.id: problem}, OnPolicyOptions(), False, "t")
    with pytest.raises(UserError, match="need the problems"):
        prompt_rows(tokenizer, [example], None, OnPolicyOptions(gate="correct"), False, "t")
    unsolved = problem.model_copy(update={"solution": None})
    example = example.model_copy(update={"problem_id": problem.id})
    with pytest.raises(UserError, match="has no gold solution"):
        prompt_rows(
            tokenizer, [example], {problem.id: unsolved}, OnPolicyOptions(teacher_context="opsd"), False, "t"
        )
