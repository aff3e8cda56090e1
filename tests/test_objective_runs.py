"""Every registered objective that learns from given data, trained briefly on the testbed, moves the student the way it should.

The student starts as the partly able student (tests/conftest.py): the testbed teacher with noise on
every weight, its level chosen per testbed build so that greedy accuracy on 128 held-out 2-digit
additions starts inside PARTLY_ABLE_WINDOW, against the teacher's 90-100%; 30 optimizer steps show
which way an objective moves it. Token-level objectives distil the teacher on gold solutions, online
or (FIRST) from the stored top-20, and must raise accuracy by more than 5 points. Pair objectives
learn from correct and incorrect teacher samples of the same problem: the preference losses (DPO,
SimPO, REDI) must widen the student's preference for the correct completion of held-out problems
(their accuracy change is recorded, not bound); AFT (an SFT term and a ranking term that never pushes
the negative down) must raise accuracy. AdaSPEC's reference is the forward-KL student.
"""

from pathlib import Path

import numpy as np
import pytest
from helpers import greedy_accuracy

from reasondistill.generate.base import SamplingParams
from reasondistill.generate.hf import HFGenerator
from reasondistill.objectives import OBJECTIVES, make_objective
from reasondistill.records import PairExample, TrainingExample
from reasondistill.tasks import TASKS
from reasondistill.train.hyperparameters import Hyperparameters
from reasondistill.train.stored_teacher import StoredTeacher
from reasondistill.train.trainer import Teachers, train_model

pytestmark = [pytest.mark.slow, pytest.mark.training_sensitive]

TASK = TASKS["arithmetic"]
STEPS = 30
MARGIN = 0.05  # accuracy must rise by more than this: 7 of 128 problems
PAIR_MARGIN = 0.01  # nats per token the held-out preference margin must widen by (from 0.46–0.60)
TOKEN_LEVEL = {"learning_rate": 3e-4, "batch_size": 16}
# Pair losses push the rejected completions' likelihood down without bound (REDI, SimPO) or through
# a margin only (DPO): at the token-level rate all three fell to 10% or less here (the REDI paper
# uses 1e-6 on 1.5B models). The window is narrow: in 30 steps DPO needs 4e-5 to rise (34% at
# 2e-5), while SimPO falls at 4e-5 (25%) and rises at 2e-5.
PAIRS = {"learning_rate": 2e-5, "batch_size": 16}
PAIR_LEARNING_RATE = {"dpo": 4e-5}
OPTIONS = {
    # The defaults (entropy weight 1, α 0.1) suit the paper's rate (5e-6). The ranking term over 10
    # candidates is about 10 nats and the entropy term about 1, against a direct term near 0.005: at
    # this rate they sharpen the noisy student's own guesses (measured 30% → 12%). Scaled to the
    # direct term's size, all three terms still take part.
    "tsd_kd": {"entropy_weight": 0.01, "alpha": 0.001},
    # Masking a fifth of the digits the solution copies costs more than 30 steps can win back
    # (30% → 24% measured); Masked Thought regularises over epochs.
    "masked_thought": {"max_rate": 0.05},
}


def train(name: str, bench: dict) -> Path:
    """Train `name` from the noisy student (once per module), return the model folder."""
    output = bench["root"] / name
    if output.exists():
        return output
    objective = make_objective(name, OPTIONS.get(name, {}))
    data = bench["pairs"] if objective.data == "pairs" else bench["examples"]
    settings = PAIRS if objective.data == "pairs" else TOKEN_LEVEL
    hp = Hyperparameters(
        objective=name,
        objective_args=OPTIONS.get(name, {}),
        epochs=STEPS * settings["batch_size"] / len(data),
        learning_rate=PAIR_LEARNING_RATE.get(name, settings["learning_rate"]),
        batch_size=settings["batch_size"],
        warmup_ratio=0.0,
        lr_scheduler="constant",
        max_length=256,
        logging_steps=STEPS,
        save_steps=10 * STEPS,
    )
    teachers = Teachers()
    if name == "first":
        teachers.stored = StoredTeacher.from_rows(bench["store"], "teacher top-20")
    elif objective.needs_teacher:
        teachers.model = bench["teacher"]
    if name == "adaspec":
        teachers.reference = train("forward_kl", bench)
    train_model(bench["student"], data, output, hp, teachers=teachers, description=name)
    return output


def teacher_pairs(teacher: HFGenerator, problems) -> list[PairExample]:
    """(correct, incorrect) teacher samples of the same problem, at a temperature that makes mistakes."""
    samples = teacher.generate(
        [p.messages for p in problems], SamplingParams(n=4, temperature=1.3, max_new_tokens=120, seed=1)
    )
    pairs = []
    for problem, completions in zip(problems, samples, strict=True):
        labels = [TASK.grader.grade(c.text, problem, c.finish_reason).label for c in completions]
        right = [c.text for c, label in zip(completions, labels, strict=True) if label == "correct"]
        wrong = [c.text for c, label in zip(completions, labels, strict=True) if label == "incorrect"]
        if right and wrong:
            pairs.append(
                PairExample(
                    problem_id=problem.id,
                    task=problem.task,
                    messages=problem.messages,
                    chosen=right[0],
                    rejected=wrong[0],
                )
            )
    return pairs


@pytest.fixture(scope="module")
def bench(testbed, partly_able, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("objective-runs")
    train_problems = TASK.sample("train", 512, seed=5, difficulties=(2,))
    examples = [
        TrainingExample(
            problem_id=p.id, task=p.task, messages=p.messages, completion=p.solution, sample_idx=0
        )
        for p in train_problems
    ]
    teacher = HFGenerator(testbed / "teacher", batch_size=256)
    scored = teacher.score([e.messages for e in examples], [e.completion for e in examples], top_k=20)
    bench = {
        "root": root,
        "teacher": testbed / "teacher",
        "student": partly_able.path,
        "examples": examples,
        "store": {(e.problem_id, 0): lp for e, lp in zip(examples, scored, strict=True)},
        "pairs": teacher_pairs(teacher, train_problems),
        "test_pairs": teacher_pairs(teacher, partly_able.problems),
        "test": partly_able.problems,
        "start": partly_able.accuracy,
    }
    assert len(bench["pairs"]) >= 200 and len(bench["test_pairs"]) >= 50
    return bench


def preference_margin(model: Path, pairs: list[PairExample]) -> float:
    """Mean over pairs of log π(chosen)/|chosen| − log π(rejected)/|rejected| (nats per token)."""
    generator = HFGenerator(model, batch_size=128)
    prompts = [p.messages for p in pairs]
    chosen = generator.score(prompts, [p.chosen for p in pairs], top_k=0)
    rejected = generator.score(prompts, [p.rejected for p in pairs], top_k=0)
    return float(
        np.mean([c.logprobs.mean() - r.logprobs.mean() for c, r in zip(chosen, rejected, strict=True)])
    )


@pytest.fixture(scope="module")
def start_margin(bench) -> float:
    """The partly able student's preference margin on the held-out pairs, before any training."""
    return preference_margin(bench["student"], bench["test_pairs"])


# objectives that learn from the student's own samples train in test_on_policy_runs.py
# AFT's SFT term on the chosen completion has full weight and (with its default `detach` constraint) the
# rejected one is never pushed down: it learns like SFT and widens no margin (0.604 → 0.605 measured)
LEARNS_LIKE_SFT = {"aft"}
OFF_POLICY = sorted(n for n, cls in OBJECTIVES.items() if not cls.on_policy_only)
PREFERENCE = sorted(n for n in OFF_POLICY if OBJECTIVES[n].data == "pairs" and n not in LEARNS_LIKE_SFT)


@pytest.mark.parametrize("name", sorted(set(OFF_POLICY) - set(PREFERENCE)))
def test_a_short_run_raises_the_students_accuracy(bench, name, margin):
    after = greedy_accuracy(train(name, bench), bench["test"])
    margin(f"{name}: accuracy after {STEPS} steps", after, ">", bench["start"] + MARGIN)


@pytest.mark.parametrize("name", PREFERENCE)
def test_a_short_run_on_pairs_widens_the_preference_margin_on_held_out_pairs(
    bench, start_margin, name, margin
):
    """What a preference loss optimises: the student prefers the teacher's correct completion of a
    held-out problem to its incorrect one by more than before.

    Not its accuracy, which these losses do not control in 30 steps: on 4 testbed builds (2026-12-06)
    DPO moved greedy accuracy by −27 to +13 points and SimPO by −20 to +15 (pushing an incorrect
    completion down also pushes down the sound steps it shares with correct ones), REDI by +10 to +23;
    it is recorded, not bound. The margin widened by 0.07–0.10 (DPO), 0.04–0.05 (REDI), 0.03–0.05
    (SimPO) nats/token against PAIR_MARGIN."""
    trained = train(name, bench)
    margin(
        f"{name}: preference margin (nats/token) after {STEPS} steps",
        preference_margin(trained, bench["test_pairs"]),
        ">",
        start_margin + PAIR_MARGIN,
    )
    accuracy = greedy_accuracy(trained, bench["test"])
    margin.record(f"{name}: accuracy change after {STEPS} steps", accuracy - bench["start"])
