"""Seconds per optimizer step of on-policy distillation (λ = 1): reasondistill vs TRL's GKDTrainer.

Both trainers distil the same randomly initialised teacher into the same student (testbed shapes:
`TEACHER_SHAPE`, `STUDENT_SHAPE`, the testbed tokenizer) fully on-policy: at every optimizer step
the student, with its current weights, samples `--max-new-tokens` tokens per prompt (temperature
0.9, TRL's default, top-k 0, top-p 1, KV cache), the frozen teacher runs forward on the sampled
sequences, and the loss is the generalized JSD with β = 0.5 (temperature 1) on the sampled tokens.
Same prompts in the same order (testbed problems of all tasks), batch size, gradient accumulation,
optimizer, learning rate, thread count and initial student weights (a fresh copy per run), in one
process. Random models rarely emit the end token (about 1 token in 600 here), so most samples run
to the full length and each `generate` call decodes all `--max-new-tokens` positions; the table
prints the mean sampled completion length of each side (about 60 of 64), so one can check that they
are comparable.

* reasondistill — `DistillationTrainer` with `StepBatches` (`OnPolicyOptions(fraction=1.0)`),
  objective `jsd` (β = 0.5) and the teacher online, wired as `train_model` does it (a dataset of
  prompt indices, `collate_indices`, no sorting within steps). Its `get_batch_samples` hands the
  step's micro-batches to `StepBatches`, which samples the prompts of *all* of them in one
  `generate` call (batch × accumulation sequences, the student in eval mode) and rebuilds the
  micro-batches from the samples. The loss forms no full logits: the student's and teacher's
  forward passes stop at the final hidden states, and the objective projects only the completion
  positions to the vocabulary, 512 at a time, recomputing each chunk's projection in the backward
  pass (`logit_chunk_size`) instead of keeping it.
* TRL — `GKDTrainer` (trl.experimental.gkd) with lmbda = 1.0, beta = 0.5, seq_kd False: its
  `training_step` samples once per *micro-batch* (`accumulation` `generate` calls per step, of
  `batch` sequences each) from the prompt part of the collated batch only (`prompts` /
  `prompt_attention_mask`: the ids before the completion mask, left-padded), then runs both models'
  full forward, forms their logits over the whole vocabulary at every position (prompt included)
  and masks the loss to the sampled tokens. Its collator gets the same prompts pre-tokenized, with
  the data's completions behind them (the ids it would train on off-policy; at λ = 1 they only set
  the token count TRL normalises the loss by — it counts them before sampling replaces them).

What differs in cost: with accumulation A, TRL makes A `generate` calls of `batch` sequences per
step where ours makes one of A × batch, and decoding models this small costs nearly the same per
token position whatever the number of sequences; ours samples under `torch.inference_mode` in eval
mode, TRL under `no_grad` in train mode (its dropout disabled); and TRL's loss works on both models'
full-vocabulary logits at every position, ours on the completion positions only.

Each trainer runs `--warmup` optimizer steps and then `--steps` timed ones (wall-clock: data
loading, sampling, teacher forward, student forward and backward, optimizer), on a fresh copy of the
same initial student. The two run back to back `--repeats` times; the ratio is the median of the
pairs' ratios, so that load from other processes between pairs cancels out. "sampling s/step" is
the part of a step spent in generation (ours: `StepBatches.history`'s `sample_seconds`; TRL: its
`generate_on_policy_outputs`, timed by a subclass that also counts the sampled tokens); the rest is
the teacher, the student's forward and backward, and the optimizer. `--accumulation 1` leaves
both with one sampling call of `batch` prompts per step. `--teacher-hidden` / `--teacher-layers`
size the teacher up (intermediate size 4 × hidden, as the testbed's).

`--compile` samples ours with `on_policy.compile` (the decoding steps through torch.compile with
dynamic shapes, `generate/decoding.py`): the first warm-up step compiles (about 10 s here), which
the timed steps leave out as they leave out the warm-up; TRL's side is unchanged.

    .venv/bin/python benchmarks/on_policy_step.py [--steps 10] [--batch-size 8] [--accumulation 2]
        [--max-new-tokens 64] [--teacher-hidden 128] [--teacher-layers 3] [--threads 1] [--repeats 5]
        [--compile] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

from datasets import Dataset
from transformers import TrainingArguments

from reasondistill.objectives import make_objective
from reasondistill.objectives.base import IGNORE_INDEX
from reasondistill.tasks import default_grader
from reasondistill.testbed.models import STUDENT_SHAPE
from reasondistill.train.data import tokenize_examples
from reasondistill.train.on_policy import StepBatches, collate_indices, prompt_rows
from reasondistill.train.on_policy_options import OnPolicyOptions
from reasondistill.train.trainer import DistillationTrainer

if str(Path(__file__).resolve().parent) not in sys.path:  # run as a script it is there already
    sys.path.append(str(Path(__file__).resolve().parent))
from kd_throughput import (  # noqa: E402
    add_shared_options,
    shared_arguments,
    step_ends,
    testbed_models,
    training_examples,
    trl_dataset,
)

BASELINE = "TRL GKDTrainer λ=1"
OURS = "reasondistill on-policy λ=1"
TEMPERATURE = 0.9  # sampling temperature: GKDConfig's default, set on our side too
BETA = 0.5  # generalized JSD β, both sides
MAX_LENGTH = 1024  # tokens per sequence (the models' positions); the prompts and samples fit well within


def arguments(args: argparse.Namespace, output_dir: str) -> dict:
    return dict(shared_arguments(args, output_dir), gradient_accumulation_steps=args.accumulation)


def on_policy_options(args: argparse.Namespace) -> OnPolicyOptions:
    return OnPolicyOptions(
        fraction=1.0,
        temperature=TEMPERATURE,
        top_k=0,
        top_p=1.0,
        max_new_tokens=args.max_new_tokens,
        compile=args.compile,
    )


def ours(args, student, teacher, tokenizer, rows, output_dir) -> DistillationTrainer:
    options = on_policy_options(args)
    step_batches = StepBatches(rows, options, tokenizer, MAX_LENGTH, seed=0, grader_for=default_grader)
    return DistillationTrainer(
        model=student,
        args=TrainingArguments(**arguments(args, output_dir)),
        train_dataset=Dataset.from_list([{"index": i} for i in range(len(rows))]),
        data_collator=collate_indices,
        processing_class=tokenizer,
        objective=make_objective("jsd", {"beta": BETA}),
        teacher=teacher,
        vocab_size=len(tokenizer),
        sort_within_step=False,
        step_batches=step_batches,
    )


def trl(args, student, teacher, tokenizer, examples, tokenized, output_dir):
    """The baseline: TRL's GKD at λ = 1, β = 0.5; the student samples every micro-batch's prompts."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    class MeasuredGKD(GKDTrainer):
        """GKDTrainer that records each sampling call: its step, seconds and sampled tokens per sequence."""

        samples: list[dict]

        def generate_on_policy_outputs(self, model, inputs, generation_config):
            started = time.perf_counter()
            ids, attention, labels = GKDTrainer.generate_on_policy_outputs(model, inputs, generation_config)
            self.samples.append(
                {
                    "step": self.state.global_step,
                    "seconds": time.perf_counter() - started,
                    "tokens": (labels != IGNORE_INDEX).sum(dim=1).tolist(),  # the loss's positions
                }
            )
            return ids, attention, labels

    dataset = trl_dataset(tokenizer, examples, tokenized)
    config = GKDConfig(
        **arguments(args, output_dir),
        lmbda=1.0,
        beta=BETA,
        temperature=TEMPERATURE,
        max_new_tokens=args.max_new_tokens,
        max_length=MAX_LENGTH,
        seq_kd=False,
    )
    trainer = MeasuredGKD(
        model=student, teacher_model=teacher, args=config, train_dataset=dataset, processing_class=tokenizer
    )
    trainer.samples = []
    return trainer


def measure(ends: list[float], sampling: list[dict], args) -> dict:
    """Seconds, sampling seconds, sampled tokens and sequences of the timed steps (after the warm-up ones).

    `sampling` holds one entry per generation call: step, seconds, tokens (total), sequences.
    """
    timed = [s for s in sampling if s["step"] >= args.warmup]
    steps = {s["step"] for s in timed}
    if steps != set(range(args.warmup, args.warmup + args.steps)):
        raise RuntimeError(f"expected a sampling call in every timed step, got steps {sorted(steps)}")
    return {
        "seconds": ends[-1] - ends[args.warmup - 1],
        "sample_seconds": sum(s["seconds"] for s in timed),
        "tokens": sum(s["tokens"] for s in timed),
        "sequences": sum(s["sequences"] for s in timed),
    }


def our_sampling(trainer: DistillationTrainer) -> list[dict]:
    history = trainer.step_batches.history
    if not all(h["on_policy"] for h in history):
        raise RuntimeError("λ = 1: every step should sample")
    return [
        {
            "step": h["step"],
            "seconds": h["sample_seconds"],
            "tokens": round(h["mean_tokens"] * h["samples"]),
            "sequences": h["samples"],
        }
        for h in history
    ]


def trl_sampling(trainer) -> list[dict]:
    return [
        {
            "step": s["step"],
            "seconds": s["seconds"],
            "tokens": sum(s["tokens"]),
            "sequences": len(s["tokens"]),
        }
        for s in trainer.samples
    ]


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps per trainer")
    parser.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps before them (>= 1)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per micro-batch")
    parser.add_argument("--accumulation", type=int, default=2, help="micro-batches per optimizer step")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="sampled tokens per prompt")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="ours samples with on_policy.compile (torch.compile'd decoding steps; compiled in the warm-up steps)",
    )
    add_shared_options(parser)
    parser.add_argument(
        "--quick", action="store_true", help="smoke test: 1 + 2 steps, batch 2, 8 new tokens, 1 repeat"
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.quick:
        args.warmup, args.steps, args.batch_size, args.max_new_tokens, args.repeats = 1, 2, 2, 8, 1
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer, teacher, initial_student = testbed_models(args, Path(tmp))
        examples = training_examples((args.warmup + args.steps) * args.batch_size * args.accumulation)
        tokenized = tokenize_examples(tokenizer, examples, max_length=MAX_LENGTH)
        parameters = {
            name: sum(p.numel() for p in model.parameters())
            for name, model in (("teacher", teacher), ("student", initial_student))
        }
        rows = prompt_rows(tokenizer, examples, None, on_policy_options(args), False, "benchmark")
        if [r.prompt_ids for r in rows] != [t.input_ids[: t.prompt_length].tolist() for t in tokenized]:
            raise RuntimeError("reasondistill's prompts differ from the ones TRL is given")
        prompt_tokens = sum(len(r.prompt_ids) for r in rows)
        print(
            f"teacher hidden {args.teacher_hidden} x {args.teacher_layers} layers ({parameters['teacher']:,}"
            f" parameters), student hidden {STUDENT_SHAPE.hidden_size} x {STUDENT_SHAPE.num_hidden_layers}"
            f" layers ({parameters['student']:,}), vocab {len(tokenizer)}; batch {args.batch_size} x"
            f" accumulation {args.accumulation}, {args.warmup} + {args.steps} steps, {args.max_new_tokens}"
            f" new tokens at temperature {TEMPERATURE} (prompts of {prompt_tokens / len(tokenized):.0f}"
            f" tokens on average), JSD β {BETA}, threads {args.threads}, {args.repeats} repeats"
        )
        results: dict[str, list[dict]] = {OURS: [], BASELINE: []}
        for repeat in range(args.repeats):
            output_dir = str(Path(tmp) / f"run{repeat}")
            trainer = ours(args, copy.deepcopy(initial_student), teacher, tokenizer, rows, output_dir)
            results[OURS].append(measure(step_ends(trainer), our_sampling(trainer), args))
            trainer = trl(
                args, copy.deepcopy(initial_student), teacher, tokenizer, examples, tokenized, output_dir
            )
            results[BASELINE].append(measure(step_ends(trainer), trl_sampling(trainer), args))
    ratios = sorted(
        a["seconds"] / b["seconds"] for a, b in zip(results[OURS], results[BASELINE], strict=True)
    )
    print(
        f"\n{'trainer (median of repeats)':<36} {'s/step':>7} {'sampling s/step':>16} {'sampled tok/s':>14}"
        f" {'tokens/sample':>14}"
    )
    for name, runs in results.items():
        seconds = median(run["seconds"] for run in runs)
        sampling = median(run["sample_seconds"] for run in runs)
        per_second = median(run["tokens"] / run["seconds"] for run in runs)
        length = sum(run["tokens"] for run in runs) / sum(run["sequences"] for run in runs)
        print(
            f"{name:<36} {seconds / args.steps:>7.3f} {sampling / args.steps:>16.3f} {per_second:>14,.0f}"
            f" {length:>14.1f}"
        )
    print(
        f"\nratio reasondistill / {BASELINE}: {median(ratios):.2f}x step time (below 1: reasondistill"
        f" faster; median of {len(ratios)} back-to-back pairs, range {ratios[0]:.2f}-{ratios[-1]:.2f}x)"
    )


if __name__ == "__main__":
    main()
