"""Training tokens per second and padding share with and without packing, on traces of mixed lengths.

Lengths are drawn like reasoning traces: log-normal around `--median` tokens (σ = `--sigma`, so a
long tail) and capped at `--max-length`; each example's first tenth is its prompt. The same student
(a Qwen2 built from a config: `--hidden`, `--layers`, sdpa attention) trains with SFT on the same
examples in the same order, with the same optimizer, for the same number of optimizer steps, three
ways, one after another in one process:

* padded, random — rows padded to the longest of their micro-batch, examples in random order
  (transformers' default);
* padded, sorted within step — reasondistill's default (`sort_within_step`): the examples of each
  optimizer step sorted by length before they are cut into micro-batches;
* packed — reasondistill's `packing`: each micro-batch's examples in one row, no padding, attention
  kept within each example through restarting position ids.

Tokens/s counts real (non-padding) tokens; the padding share is padding / all positions the model
computes. Without a varlen attention kernel (flash-attention on GPUs), transformers masks a packed row
as one long sequence: attention then costs (Σ lengths)² per row instead of Σ length², which this CPU
run shows as it is.

    .venv/bin/python benchmarks/packing.py [--examples 32] [--median 2048] [--sigma 0.6]
        [--batch-size 4] [--accumulation 2] [--hidden 128] [--layers 2] [--threads N] [--quick]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch
from datasets import Dataset
from transformers import PrinterCallback, Qwen2Config, Qwen2ForCausalLM, TrainingArguments

from reasondistill.objectives import make_objective
from reasondistill.objectives.base import IGNORE_INDEX
from reasondistill.train.data import CompletionCollator
from reasondistill.train.trainer import DistillationTrainer

VOCAB = 2048


def lengths(args: argparse.Namespace) -> list[int]:
    rng = np.random.default_rng(0)
    drawn = rng.lognormal(np.log(args.median), args.sigma, args.examples)
    return [int(n) for n in np.clip(drawn, 16, args.max_length)]


def dataset(sizes: list[int]) -> Dataset:
    rng = np.random.default_rng(1)
    rows = []
    for i, n in enumerate(sizes):
        ids = rng.integers(2, VOCAB, n).tolist()
        prompt = max(1, n // 10)
        rows.append(
            {"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:], "length": n, "index": i}
        )
    return Dataset.from_list(rows)


def student(args: argparse.Namespace) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=args.max_length, attn_implementation="sdpa",
    )  # fmt: skip
    return Qwen2ForCausalLM(config)


class Counting:
    """A collator wrapper counting the real tokens and the positions of the batches it makes."""

    def __init__(self, collator: CompletionCollator):
        self.collator, self.tokens, self.positions = collator, 0, 0

    def __call__(self, features):
        batch = self.collator(features)
        self.tokens += sum(len(f["input_ids"]) for f in features)
        self.positions += batch["input_ids"].numel()
        return batch


def run(args: argparse.Namespace, data: Dataset, way: str, output_dir: str) -> dict:
    steps = len(data) // (args.batch_size * args.accumulation)
    training = TrainingArguments(
        output_dir=f"{output_dir}/{way}", per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.accumulation, max_steps=steps, learning_rate=1e-4,
        lr_scheduler_type="constant", report_to=[], save_strategy="no", disable_tqdm=True,
        dataloader_pin_memory=False, remove_unused_columns=False, seed=0, use_cpu=True,
    )  # fmt: skip
    collator = Counting(CompletionCollator(0, packed=way == "packed"))
    trainer = DistillationTrainer(
        model=student(args), args=training, train_dataset=data, data_collator=collator,
        objective=make_objective("sft"), sort_within_step=way != "padded, random",
    )  # fmt: skip
    trainer.remove_callback(PrinterCallback)
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "tokens_per_second": collator.tokens / seconds,
        "padding_share": 1 - collator.tokens / collator.positions,
        "loss": trainer.state.log_history[-1].get("train_loss"),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--median", type=int, default=2048)
    parser.add_argument("--sigma", type=float, default=0.6)
    parser.add_argument("--max-length", type=int, default=8192)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--accumulation", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a tiny run (tests)")
    args = parser.parse_args(argv)
    if args.quick:
        args.examples, args.median, args.max_length, args.hidden = 8, 48, 128, 16
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = lengths(args)
    data = dataset(sizes)
    print(
        f"SFT, {len(sizes)} examples, lengths log-normal median {args.median} σ {args.sigma} "
        f"(min {min(sizes)}, median {int(np.median(sizes))}, max {max(sizes)}), micro-batch {args.batch_size} "
        f"x {args.accumulation} accumulation, student hidden {args.hidden} x {args.layers} layers, sdpa, "
        f"{torch.get_num_threads()} threads"
    )
    results = {}
    ways = ("padded, random", "padded, sorted within step", "packed")
    with tempfile.TemporaryDirectory() as output_dir:
        warm_up = data.select(range(args.batch_size * args.accumulation))
        for way in ways if not args.quick else ():  # imports, thread pools, kernels warmed up first
            run(args, warm_up, way, output_dir)
        for way in ways:
            results[way] = run(args, data, way, output_dir)
    base = results["padded, random"]
    print(f"{'':28} {'tokens/s':>9} {'padding':>8} {'seconds':>8} {'vs random':>10} {'loss':>8}")
    for way, row in results.items():
        print(
            f"{way:28} {row['tokens_per_second']:>9,.0f} {row['padding_share']:>8.1%} {row['seconds']:>8.2f}"
            f" {row['tokens_per_second'] / base['tokens_per_second']:>9.2f}x {row['loss']:>8.4f}"
        )


if __name__ == "__main__":
    main()
