"""On-policy distillation on the testbed: every variant raises the student's accuracy in a few steps,
samples come from the current weights, and reverse KL against itself does not move the student.

The student is the partly able student (tests/conftest.py, as in test_objective_runs.py): the testbed
teacher with noise on every weight, starting inside PARTLY_ABLE_WINDOW of greedy accuracy on held-out
2-digit additions whatever the build; each variant trains STEPS optimizer steps on its own samples of
2-digit training problems.
"""

import textwrap
from pathlib import Path

import pytest
import torch
from helpers import greedy_accuracy
from transformers import AutoModelForCausalLM, AutoTokenizer

from reasondistill.generate.base import SamplingParams
from reasondistill.generate.hf import HFGenerator
from reasondistill.generate.openai import OpenAIGenerator
from reasondistill.recipe import run_recipe
from reasondistill.records import TrainingExample
from reasondistill.tasks import TASKS
from reasondistill.testing.server import serve_in_thread
from reasondistill.train.hyperparameters import Hyperparameters
from reasondistill.train.on_policy import StepBatches, privileged_messages
from reasondistill.train.on_policy_options import TEACHER_SELF, OnPolicyOptions
from reasondistill.train.trainer import Teachers, train_model

pytestmark = [pytest.mark.slow, pytest.mark.training_sensitive]

TASK = TASKS["arithmetic"]
STEPS = 12
MARGIN = 0.05  # accuracy must rise by more than this: 7 of 128 problems
SAMPLING = {"max_new_tokens": 100}
# name: (objective, objective_args, on-policy options, learning rate, prompts per step, teacher)
VARIANTS = {
    # GKD: half the steps on the student's samples, half on the gold solutions
    "gkd-jsd": ("jsd", {"beta": 0.5}, {"fraction": 0.5}, 3e-4, 16, "teacher"),
    "gkd-reverse-kl": ("reverse_kl", {}, {}, 3e-4, 16, "teacher"),
    # the per-token advantage log p_T − log q reaches −20 nats on a token the teacher rules out: at 3e-4
    # those steps undid the rest (33% → 33% on one build, 54% → 53% on another); 1e-4 learns
    "reverse-kl-pg": ("reverse_kl_pg", {}, {}, 1e-4, 16, "teacher"),
    # GRPO wants a learning rate far below the distillation losses' (at 3e-4 it fell to 39%); β is the paper's
    "kdrl": ("kdrl", {}, {"samples_per_prompt": 4}, 5e-5, 8, "teacher"),
    # the gate leaves a third of the samples or fewer: at 3e-4 such noisy steps wrecked the student on
    # two builds (34% → 20%, 54% → 30%); 1e-4 learns
    "gated": ("forward_kl", {}, {"gate": "correct"}, 1e-4, 16, "teacher"),
    # a teacher behind an OpenAI-compatible server, answering with its top-20 over each sample
    "served-forward-kl": ("forward_kl", {}, {}, 3e-4, 16, "server"),
}


def hyperparameters(objective, options, learning_rate, prompts, steps, examples) -> Hyperparameters:
    return Hyperparameters(
        objective=objective,
        objective_args=options,
        epochs=steps * prompts / len(examples),
        learning_rate=learning_rate,
        batch_size=prompts,
        warmup_ratio=0.0,
        lr_scheduler="constant",
        max_length=256,
        logging_steps=steps,
        save_steps=10 * steps,
    )


@pytest.fixture(scope="module")
def bench(testbed, partly_able, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("on-policy")
    problems = TASK.sample("train", 256, seed=5, difficulties=(2,))
    bench = {
        "root": root,
        "testbed": testbed,
        "student": partly_able.path,
        "problems": {p.id: p for p in problems},
        "examples": [
            TrainingExample(problem_id=p.id, task=p.task, messages=p.messages, completion=p.solution)
            for p in problems
        ],
        "test": partly_able.problems,
        "start": partly_able.accuracy,
    }
    return bench


@pytest.fixture(scope="module")
def served_teacher(testbed):
    with serve_in_thread(testbed / "teacher", served_name="teacher") as running:
        yield OpenAIGenerator(
            "teacher", running.base_url, endpoint="completions", tokenizer=str(testbed / "teacher")
        )


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_each_on_policy_variant_raises_the_students_accuracy(bench, variant, request, margin):
    objective, options, on_policy, learning_rate, prompts, teacher = VARIANTS[variant]
    teachers = Teachers()
    if teacher == "server":
        teachers.scorer, teachers.scorer_top_k = request.getfixturevalue("served_teacher"), 20
    else:
        teachers.model = bench["testbed"] / "teacher" if teacher == "teacher" else teacher
    output = bench["root"] / variant
    stats = train_model(
        bench["student"],
        bench["examples"],
        output,
        hyperparameters(objective, options, learning_rate, prompts, STEPS, bench["examples"]),
        teachers=teachers,
        on_policy=OnPolicyOptions(**SAMPLING, **on_policy),
        problems=bench["problems"],
        description=variant,
    )
    sampled = stats["on_policy"]
    assert sampled["steps"] == STEPS
    if on_policy.get("fraction", 1) == 1:
        assert sampled["on_policy_steps"] == STEPS
    else:
        assert 0 < sampled["on_policy_steps"] < STEPS
    if on_policy.get("gate"):
        assert 0 < sampled["kept_samples"] < sampled["samples"]  # the gate dropped the rejected samples
    after = greedy_accuracy(output, bench["test"])
    margin(f"{variant}: accuracy after {STEPS} steps", after, ">", bench["start"] + MARGIN)


def test_samples_come_from_the_current_weights(bench, monkeypatch):
    """Each step's samples are what the weights of that step write, and they change after an optimizer step."""
    seen = []
    sample = StepBatches._sample

    def recording(self, model, rows, seed, seeds):
        samples = sample(self, model, rows, seed, seeds)
        weights = {name: value.detach().clone() for name, value in model.state_dict().items()}
        seen.append((weights, [r.prompt_ids for r in rows], [s.token_ids for s in samples]))
        return samples

    monkeypatch.setattr(StepBatches, "_sample", recording)
    examples = bench["examples"][:8]
    train_model(
        bench["student"],
        examples,
        bench["root"] / "current-weights",
        hyperparameters("forward_kl", {}, 3e-3, 8, 3, examples),
        teachers=Teachers(model=bench["testbed"] / "teacher"),
        on_policy=OnPolicyOptions(temperature=0, **SAMPLING),  # greedy: a function of the weights
        description="current weights",
    )
    assert len(seen) == 3
    tokenizer = AutoTokenizer.from_pretrained(bench["student"])
    model = AutoModelForCausalLM.from_pretrained(bench["student"])
    greedy = SamplingParams(temperature=0, **SAMPLING)
    for weights, prompts, tokens in seen:
        model.load_state_dict(weights)
        regenerated = HFGenerator.around(model.eval(), tokenizer).generate_ids(prompts, greedy)
        assert [c[0].token_ids for c in regenerated] == tokens
    assert any(not torch.equal(seen[0][0][name], seen[1][0][name]) for name in seen[0][0])
    # every step is an epoch of the same 8 prompts: after two updates the student answers them anew
    first, last = (
        dict(zip(map(tuple, prompts), tokens, strict=True)) for _, prompts, tokens in (seen[0], seen[2])
    )
    assert first.keys() == last.keys() and first != last


def test_a_served_teacher_behind_two_servers_teaches_what_one_server_does(bench, testbed):
    """The served teacher scores the samples through the multi-server client (as `score` does): with
    its requests spread over two servers the student ends with the weights one server gives."""
    examples = bench["examples"][:8]
    weights = []
    with (
        serve_in_thread(testbed / "teacher", served_name="teacher") as first,
        serve_in_thread(testbed / "teacher", served_name="teacher") as second,
    ):
        for name, urls in (("one", [first.base_url]), ("two", [first.base_url, second.base_url])):
            scorer = OpenAIGenerator(
                "teacher", urls, endpoint="completions", tokenizer=str(testbed / "teacher")
            )
            teachers = Teachers()
            teachers.scorer, teachers.scorer_top_k = scorer, 20
            output = bench["root"] / f"served-{name}"
            train_model(
                bench["student"],
                examples,
                output,
                hyperparameters("forward_kl", {}, 3e-4, 8, 2, examples),
                teachers=teachers,
                on_policy=OnPolicyOptions(**SAMPLING),
                description=f"served by {name}",
            )
            asked = {url: counts["requests"] for url, counts in scorer.usage.servers.items()}
            assert len(asked) == len(urls) and all(asked.values()), asked
            scorer.close()
            weights.append(AutoModelForCausalLM.from_pretrained(output).state_dict())
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])


def test_reverse_kl_against_itself_leaves_the_student_unchanged(bench):
    """teacher == student: the reverse-KL advantage is 0 on every token, so no weight moves."""
    examples = bench["examples"][:8]
    output = bench["root"] / "self-reverse-kl"
    stats = train_model(
        bench["student"],
        examples,
        output,
        hyperparameters("reverse_kl_pg", {}, 3e-3, 8, 2, examples),
        teachers=Teachers(model=TEACHER_SELF),
        on_policy=OnPolicyOptions(**SAMPLING),
        description="self reverse kl",
    )
    assert stats["loss_curve"][-1][1] == 0
    before = AutoModelForCausalLM.from_pretrained(bench["student"]).state_dict()
    after = AutoModelForCausalLM.from_pretrained(output).state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)


RECIPE = """
run_dir: {run_dir}
steps:
  - problems: {{tasks: [arithmetic], train: 16, test: 4, difficulty: {{arithmetic: [2]}}}}
  - train:
      name: kdrl
      init: {student}
      data: problems
      teacher: "testbed:teacher"
      objective: kdrl
      on_policy: {{samples_per_prompt: 4, max_new_tokens: 100}}
      epochs: 1
      batch_size: 4
      learning_rate: 0.0001
      logging_steps: 1
"""


def test_a_recipe_trains_on_policy_from_the_runs_problems(bench, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(textwrap.dedent(RECIPE.format(run_dir=tmp_path / "run", student=bench["student"])))
    run = run_recipe(recipe)
    stats = run.manifest()["steps"]["train:kdrl"]["stats"]
    assert stats["steps"] == 4 and stats["on_policy"]["on_policy_steps"] == 4
    assert stats["on_policy"]["samples"] == 16 * 4
    assert 0 <= stats["on_policy"]["mean_reward"] <= 1
    assert len(stats["loss_curve"]) == 4


READER_TEMPLATE = "{problem}\nReference solution: {solution}"
READER_STEPS = 120
# At 2e-4 the reader learned to read the solution on one testbed build and not on another (31% with it
# in view, against 5% without); at 1e-3 it reads, but OPSD from it then fails; 5e-4 does both.
READER_LEARNING_RATE = 5e-4


@pytest.fixture(scope="module")
def reader(bench) -> tuple[Path, float]:
    """The noisy student taught to read a gold solution in its prompt, and its accuracy without one.

    OPSD rests on the student solving far more with the solution in view, as LLMs do; the testbed
    models were never shown one (with READER_TEMPLATE the testbed teacher answers 0%), so this
    student first learns to read it (SFT on prompts that hold the solution), which leaves it a poor
    solver without."""
    problems = list(bench["problems"].values())
    examples = [
        TrainingExample(
            problem_id=p.id,
            task=p.task,
            messages=privileged_messages(p, READER_TEMPLATE, "reader"),
            completion=p.solution,
        )
        for p in problems
    ]
    output = bench["root"] / "reader"
    train_model(
        bench["student"],
        examples,
        output,
        hyperparameters("sft", {}, READER_LEARNING_RATE, 16, READER_STEPS, examples),
        description="reader",
    )
    return output, greedy_accuracy(output, bench["test"])


def test_opsd_distils_the_student_reading_the_solution_into_the_student_without_it(bench, reader, margin):
    """OPSD with the paper's fixed teacher: the initial weights, reading the gold solution, score the
    student's samples of the bare problem (forward KL, the authors' final choice)."""
    student, start = reader
    with_solution = [
        p.model_copy(update={"messages": privileged_messages(p, READER_TEMPLATE, "test")})
        for p in bench["test"]
    ]
    margin(
        "reader: accuracy with the solution in view",
        greedy_accuracy(student, with_solution),
        ">",
        start + 0.3,
    )
    output = bench["root"] / "opsd"
    train_model(
        student,
        bench["examples"],
        output,
        hyperparameters("forward_kl", {}, 1e-4, 16, STEPS, bench["examples"]),
        teachers=Teachers(model=student),
        on_policy=OnPolicyOptions(teacher_context=READER_TEMPLATE, **SAMPLING),
        problems=bench["problems"],
        description="opsd",
    )
    after = greedy_accuracy(output, bench["test"])
    margin(f"opsd: accuracy after {STEPS} steps", after, ">", start + MARGIN)


def test_opsd_self_teacher_is_the_student_until_it_reads_the_solution(bench):
    """`teacher: self` on the student's own prompt is the student itself (loss 0, no signal); with
    the gold solution in its prompt it is another distribution."""
    examples = bench["examples"][:8]
    losses = {}
    for name, context in (("no-context", None), ("context", READER_TEMPLATE)):
        stats = train_model(
            bench["student"],
            examples,
            bench["root"] / f"opsd-{name}",
            hyperparameters("forward_kl", {}, 3e-4, 8, 2, examples).model_copy(update={"logging_steps": 1}),
            teachers=Teachers(model=TEACHER_SELF),
            on_policy=OnPolicyOptions(teacher_context=context, **SAMPLING),
            problems=bench["problems"],
            description=f"opsd {name}",
        )
        losses[name] = [loss for _, loss in stats["loss_curve"]]
    assert max(losses["no-context"]) < 1e-6
    assert min(losses["context"]) > 1e-2


def test_one_sampling_call_serves_every_accumulation_micro_batch(bench, monkeypatch):
    """Samples are drawn once per optimizer step, for the prompts of all its micro-batches."""
    calls = []
    sample = StepBatches._sample

    def counting(self, model, rows, seed, seeds):
        calls.append(len(rows))
        return sample(self, model, rows, seed, seeds)

    monkeypatch.setattr(StepBatches, "_sample", counting)
    examples = bench["examples"][:16]
    hp = hyperparameters("forward_kl", {}, 3e-4, 4, 2, examples)
    stats = train_model(
        bench["student"],
        examples,
        bench["root"] / "accumulation",
        hp.model_copy(update={"gradient_accumulation_steps": 2, "epochs": 1.0}),
        teachers=Teachers(model=bench["testbed"] / "teacher"),
        on_policy=OnPolicyOptions(**SAMPLING),
        description="accumulation",
    )
    assert stats["steps"] == 2 and calls == [8, 8]  # 2 steps × (2 micro-batches of 4 prompts)
    assert stats["on_policy"]["samples"] == 16
