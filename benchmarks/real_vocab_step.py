"""Time and peak memory of a training step at Qwen2.5's real vocabulary, through `train_model`.

Models: random Qwen2 models built from the real Qwen2.5 tokenizer (testbed/real_vocab.py), shaped
like the embedding-heavy end of real students: a student 896 wide (Qwen2.5-0.5B's width; its tied
embedding alone has 151,936 × 896 = 136M parameters) with 2 layers, and a teacher 1536 wide
(Qwen2.5-1.5B's width) with 2 layers and an untied 152,064-row head (the 7B family's padding).
Examples: GSM8K train rows as prompts with their worked solutions as completions (about 150 tokens
each with the prompt). Each objective runs in a fresh subprocess: `train_model` for `--steps`
optimizer steps of `--batch` examples, float32 on the CPU; reported are seconds per step (the
Trainer's own timing over all steps, the first included), the peak resident set size of the
process (ru_maxrss), and how much of it came in `train_model` (which loads the models, then trains:
weights, gradients, optimizer state, activations).

Not a comparison with another tool (kd_loss_memory.py compares the loss itself with a naive
implementation and TRL): this records what one step of each path costs at this vocabulary.

    .venv/bin/python benchmarks/real_vocab_step.py [--steps 3] [--batch 4]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
OBJECTIVES = {
    "sft": {"objective": "sft"},
    "forward_kl, online teacher": {"objective": "forward_kl", "teacher": True},
}


def child(args: argparse.Namespace) -> None:
    from reasondistill.records import TrainingExample
    from reasondistill.tasks.problem_sets import ProblemSetSpec, load_problem_set
    from reasondistill.train.hyperparameters import Hyperparameters
    from reasondistill.train.trainer import Teachers, train_model

    work = Path(args.work)
    spec = ProblemSetSpec(
        name="gsm",
        preset="gsm8k",
        file=str(SHARED / "benchmarks/gsm8k/train.jsonl"),
        limit=args.steps * args.batch,
    )
    examples = [
        TrainingExample(problem_id=p.id, task=p.task, messages=p.messages, completion=p.solution)
        for p in load_problem_set(spec).train
    ]
    config = OBJECTIVES[args.child]
    teachers = Teachers(model=str(work / "teacher")) if config.get("teacher") else Teachers()
    hp = Hyperparameters(
        objective=config["objective"], epochs=1, batch_size=args.batch, learning_rate=1e-4,
        max_length=512, logging_steps=1,
    )  # fmt: skip
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    stats = train_model(work / "student", examples, work / "out", hp, teachers=teachers, description="bench")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {
                "seconds_per_step": stats["seconds"] / stats["steps"],
                "steps": stats["steps"],
                "completion_tokens": stats["completion_tokens"],
                "peak_mib": peak / 1024,
                "step_mib": (peak - before) / 1024,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    from reasondistill.testbed.real_vocab import (
        QWEN_7B_ROWS,
        QWEN_ROWS,
        build_real_tokenizer,
        save_random_model,
    )

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tokenizer = build_real_tokenizer(SHARED / "tokenizers" / "Qwen2.5-0.5B-Instruct", work / "tokenizer")
        save_random_model(tokenizer, work / "student", rows=QWEN_ROWS, hidden_size=896, heads=14, kv_heads=2)
        save_random_model(
            tokenizer, work / "teacher", rows=QWEN_7B_ROWS, hidden_size=1536, heads=12, kv_heads=2, tie=False
        )
        print(f"| objective | s/step (batch {args.batch}) | peak RSS MiB | of it in train_model MiB |")
        print("|---|---|---|---|")
        for name in OBJECTIVES:
            command = [sys.executable, __file__, "--child", name, "--work", str(work),
                       "--steps", str(args.steps), "--batch", str(args.batch)]  # fmt: skip
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            result = json.loads(done.stdout.strip().splitlines()[-1])
            print(
                f"| {name} | {result['seconds_per_step']:.2f} | {result['peak_mib']:.0f} | {result['step_mib']:.0f} |"
            )


if __name__ == "__main__":
    main()
