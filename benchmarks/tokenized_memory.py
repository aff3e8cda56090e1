"""Memory of a training run's tokenized examples: `tokenize_examples` (int32 arrays, 4,096 examples
tokenized at a time) against the previous code, which tokenized every example at once into Python
lists of ints and kept them as lists.

`--examples` training examples with completions of `--words` words (testbed arithmetic vocabulary,
the testbed tokenizer) are tokenized in a fresh process per way. Reported: the process's private
memory (RssAnon) after tokenizing, above what it held with the examples alone, and per token.
CPython keeps the memory of freed small objects, so the previous code's lists cost their peak
for the rest of a run even once dropped.

    .venv/bin/python benchmarks/tokenized_memory.py [--examples 40000] [--words 500] [--quick]
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import tempfile
from pathlib import Path

from reasondistill.chat import completion_ids, prompt_ids
from reasondistill.objectives.base import IGNORE_INDEX
from reasondistill.records import TrainingExample
from reasondistill.testbed.tokenizer import build_tokenizer
from reasondistill.train.data import tokenize_examples

BASELINE = "previous code: Python lists"
OURS = "reasondistill: int32 arrays, in chunks"
WORDS = ["12", "+", "7", "=", "19", "so", "the", "answer", "is", "carry", "1", "then", "add"]


def private_mib() -> float:
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(fields["RssAnon"].split()[0]) / 1024


def previous_tokenize(tokenizer, examples, max_length: int) -> list[tuple[list[int], list[int], int]]:
    """The code before 2026-12-07: every example's ids at once, as lists."""
    prompts = prompt_ids(tokenizer, [e.messages for e in examples])
    completions = completion_ids(tokenizer, [e.completion for e in examples])
    return [
        ((p + c)[:max_length], ([IGNORE_INDEX] * len(p) + c)[:max_length], len(p) + len(c))
        for p, c in zip(prompts, completions, strict=True)
    ]


def child(way: str, examples: int, words: int, folder: Path) -> None:
    """One way, in this fresh process: prints `private_mib tokens`."""
    tokenizer = build_tokenizer(folder / "tokenizer")
    rng = random.Random(0)
    rows = [
        TrainingExample(
            problem_id=f"p{i}", task="arithmetic", messages=[{"role": "user", "content": "What is 12 + 7?"}],
            completion=" ".join(rng.choice(WORDS) for _ in range(words)), sample_idx=0,
        )
        for i in range(examples)
    ]  # fmt: skip
    before = private_mib()
    if way == "previous":
        tokenized = previous_tokenize(tokenizer, rows, 4096)
        tokens = sum(len(ids) for ids, _, _ in tokenized)
    else:
        tokenized = tokenize_examples(tokenizer, rows, 4096)
        tokens = sum(len(t.input_ids) for t in tokenized)
    print(private_mib() - before, tokens)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--examples", type=int, default=40_000)
    parser.add_argument("--words", type=int, default=500, help="words per completion")
    parser.add_argument("--threads", type=int, default=None, help="(unused: no model runs)")
    parser.add_argument("--quick", action="store_true", help="2,000 examples of 100 words (a smoke test)")
    parser.add_argument("--child", choices=["previous", "ours"], help=argparse.SUPPRESS)
    parser.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.examples, args.words, args.dir)
        return
    if args.quick:
        args.examples, args.words = 2_000, 100
    print(f"{args.examples} examples, completions of {args.words} words")
    print(f"{'':40s} {'private MiB':>12s} {'B/token':>8s}")
    memory = {}
    for label, way in ((OURS, "ours"), (BASELINE, "previous")):
        with tempfile.TemporaryDirectory() as tmp:
            done = subprocess.run(
                [sys.executable, __file__, "--child", way, "--dir", tmp, "--examples", str(args.examples),
                 "--words", str(args.words)],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
        mib, tokens = done.stdout.split()[-2:]
        memory[way] = float(mib)
        print(f"{label:40s} {float(mib):12.1f} {float(mib) * 2**20 / int(tokens):8.1f}")
    print(
        f"tokens: {int(tokens):,}; private memory: {memory['ours'] / max(memory['previous'], 1e-9):.3f}x the previous code's"
    )


if __name__ == "__main__":
    main()
