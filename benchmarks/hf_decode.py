"""Decoding tokens/s of the hf backend (`decoding.decode`) against plain `model.generate`, in one run.

The same prompts, model, sampling settings (temperature, top-k 0, top-p 1, `max_new_tokens`) and
batch size (sequences decoded together), under `torch.inference_mode`, back to back; tokens are the
completion tokens each side returns (up to and including the end token), so a row that
`model.generate` keeps decoding after its end counts nothing. Three sides:

* `model.generate` — transformers' sampling loop as the hf backend called it until 2026-12-07
  (DynamicCache, the whole batch decoded until its last row ends, one `torch.multinomial` per step
  over the batch);
* `model.generate` + row streams — the same loop with the Gumbel-max logits processor the on-policy
  sampler used until 2026-12-07 so that each sequence drew from its own seeded stream (V uniforms per
  sequence and token, one `torch.rand` call per sequence and step);
* reasondistill — `HFGenerator.generate_ids`: `KVBuffer` (keys and values written in place), rows
  leaving the batch as they end, one SplitMix64 uniform per sequence and token (inverse CDF);
* reasondistill, compiled — the same with `compile=True`: the one-token steps through torch.compile
  (inductor, dynamic shapes). Its first call compiles; that time is printed apart and not in the rate
  (a generate job or an on-policy run pays it once). `--quick` leaves this side out.

The sides do not draw the same samples (different random streams), so their completions differ in
length: the table prints each side's mean completion length, and the ratio is of tokens/s.

Scenarios: `trained` — the trained testbed teacher (built or taken from the cache on first use)
answering testbed problems, whose completions end (end token) at lengths that vary, as a generate
stage's do; `full-length` — a random student of the testbed's shape, which rarely emits the end
token, so every row runs to `max_new_tokens` (per-token speed alone, the on-policy benchmark's case).

    .venv/bin/python benchmarks/hf_decode.py [--repeats 3] [--threads 2] [--device cpu] [--quick]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from statistics import median
from typing import NamedTuple

import torch
from transformers import LogitsProcessor, LogitsProcessorList, PreTrainedModel

from reasondistill.chat import prompt_ids
from reasondistill.generate.base import SamplingParams
from reasondistill.generate.hf import HFGenerator
from reasondistill.models import load_causal_lm, load_tokenizer
from reasondistill.tasks import TASKS
from reasondistill.testbed.models import STUDENT_SHAPE, build_testbed, save_initial_model

BASELINE = "model.generate"
STREAMS = "model.generate + row streams"
OURS = "reasondistill"
COMPILED = "reasondistill, compiled"


class Scenario(NamedTuple):
    name: str
    prompts: int
    n: int
    batch_size: int  # sequences decoded together
    max_new_tokens: int
    temperature: float


SCENARIOS = (
    Scenario("trained", prompts=128, n=4, batch_size=64, max_new_tokens=256, temperature=0.8),
    Scenario("full-length", prompts=32, n=1, batch_size=8, max_new_tokens=64, temperature=0.9),
)


class GumbelRowStreams(LogitsProcessor):
    """The on-policy sampler's processor until 2026-12-07: each row's token by Gumbel-max from its own
    `torch.Generator`, left as the only finite score so that `model.generate`'s greedy search takes it."""

    def __init__(self, seeds: list[int], temperature: float, device: torch.device):
        self.generators = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]
        self.temperature = temperature

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.float() / self.temperature
        uniform = torch.stack(
            [torch.rand(scores.shape[1], generator=g, device=scores.device) for g in self.generators]
        )
        gumbel = -torch.log(-torch.log(uniform.clamp(torch.finfo(uniform.dtype).tiny, 1.0)))
        chosen = (scores + gumbel).argmax(dim=-1, keepdim=True)
        return torch.full_like(scores, float("-inf")).scatter_(1, chosen, 0.0)


@torch.inference_mode()
def plain_generate(model: PreTrainedModel, tokenizer, prompts, scenario: Scenario, streams: bool) -> int:
    """Completion tokens `model.generate` returns for every prompt (batches of `batch_size` sequences)."""
    torch.manual_seed(0)
    per_batch = max(1, scenario.batch_size // scenario.n)
    eos, tokens = tokenizer.eos_token_id, 0
    for start in range(0, len(prompts), per_batch):
        batch = prompts[start : start + per_batch]
        if streams:  # each sequence given as its own row, as the on-policy sampler did
            rows = [p for p in batch for _ in range(scenario.n)]
            kwargs = {
                "do_sample": False,
                "logits_processor": LogitsProcessorList(
                    [
                        GumbelRowStreams(
                            list(range(start, start + len(rows))), scenario.temperature, model.device
                        )
                    ]
                ),
            }
        else:
            rows = batch
            kwargs = {
                "do_sample": True,
                "temperature": scenario.temperature,
                "top_k": 0,
                "top_p": 1.0,
                "num_return_sequences": scenario.n,
            }
        inputs = tokenizer.pad({"input_ids": rows}, return_tensors="pt").to(model.device)
        output = model.generate(
            **inputs, max_new_tokens=scenario.max_new_tokens, pad_token_id=tokenizer.pad_token_id, **kwargs
        )
        for ids in output[:, inputs["input_ids"].shape[1] :].tolist():
            tokens += ids.index(eos) + 1 if eos in ids else len(ids)
    return tokens


def ours(generator: HFGenerator, prompts, scenario: Scenario) -> int:
    sampling = SamplingParams(
        n=scenario.n,
        temperature=scenario.temperature,
        top_k=0,
        top_p=1.0,
        max_new_tokens=scenario.max_new_tokens,
        seed=0,
    )
    return sum(c.completion_tokens for row in generator.generate_ids(prompts, sampling) for c in row)


def model_folder(scenario: Scenario, scratch: Path) -> Path:
    if scenario.name == "trained":
        return build_testbed() / "teacher"
    tokenizer = build_testbed() / "tokenizer"
    save_initial_model(STUDENT_SHAPE, tokenizer, scratch / "random-student", seed=0)
    return scratch / "random-student"


def run(scenario: Scenario, args: argparse.Namespace, scratch: Path) -> None:
    folder = model_folder(scenario, scratch)
    tokenizer = load_tokenizer(folder)
    tokenizer.padding_side = "left"
    model = load_causal_lm(folder).to(args.device).eval()
    generator = HFGenerator.around(model, tokenizer, batch_size=scenario.batch_size)
    compiled = HFGenerator.around(model, tokenizer, batch_size=scenario.batch_size, compile=True)
    problems = [p for task in TASKS.values() for p in task.sample("test", scenario.prompts, seed=0)]
    prompts = prompt_ids(tokenizer, [p.messages for p in problems[: scenario.prompts]])
    sides = {
        BASELINE: lambda: plain_generate(model, tokenizer, prompts, scenario, streams=False),
        STREAMS: lambda: plain_generate(model, tokenizer, prompts, scenario, streams=True),
        OURS: lambda: ours(generator, prompts, scenario),
    }
    if not args.quick:
        sides[COMPILED] = lambda: ours(compiled, prompts, scenario)
    warmup = {}
    for name, side in sides.items():
        started = time.perf_counter()
        side()
        warmup[name] = time.perf_counter() - started
    results: dict[str, list[tuple[float, int]]] = {name: [] for name in sides}
    for _ in range(args.repeats):
        for name, side in sides.items():
            started = time.perf_counter()
            tokens = side()
            results[name].append((time.perf_counter() - started, tokens))
    sequences = len(prompts) * scenario.n
    print(
        f"\n{scenario.name}: {folder.name} ({sum(p.numel() for p in model.parameters()):,} parameters),"
        f" {len(prompts)} prompts x {scenario.n}, batch {scenario.batch_size} sequences,"
        f" max_new_tokens {scenario.max_new_tokens}, temperature {scenario.temperature}, {args.device},"
        f" {torch.get_num_threads()} threads, median of {args.repeats}"
    )
    if COMPILED in warmup:
        print(f"compiled side's first call (compiling): {warmup[COMPILED]:.1f} s, not counted below")
    print(f"{'side':<30} {'s':>7} {'tokens/s':>10} {'mean length':>12} {'ratio':>7}")
    rates = {name: median(tokens / seconds for seconds, tokens in runs) for name, runs in results.items()}
    for name, runs in results.items():
        seconds = median(s for s, _ in runs)
        length = sum(t for _, t in runs) / len(runs) / sequences
        print(
            f"{name:<30} {seconds:>7.2f} {rates[name]:>10,.0f} {length:>12.1f}"
            f" {rates[name] / rates[BASELINE]:>6.2f}x"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="smoke test: few prompts, short completions")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    scenarios = SCENARIOS
    if args.quick:
        args.repeats = 1
        scenarios = tuple(
            Scenario(s.name, prompts=4, n=2, batch_size=4, max_new_tokens=16, temperature=s.temperature)
            for s in SCENARIOS
        )
    with tempfile.TemporaryDirectory() as scratch:
        for scenario in scenarios:
            run(scenario, args, Path(scratch))


if __name__ == "__main__":
    main()
