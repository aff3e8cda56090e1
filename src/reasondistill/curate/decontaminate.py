"""`decontaminate`: find training examples that share an n-gram with an evaluation benchmark, and drop them.

Texts are case-folded and split into words (`\\w+`). A training example overlaps a benchmark
problem when one of its n-grams (default 8, the size used by open-r1's decontamination) occurs
in the problem's own text (without the instruction our prompts add); a problem shorter than n
words must occur whole. N-grams found in many problems of one benchmark are template text, not
evidence of contamination (ProofWriter's fixed question wording, say), so they are not indexed.

The step writes the kept examples to curated/<name> (every example when `drop` is off) and the
overlaps found to decontamination/<name>.json.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Literal

from pydantic import Field

from ..errors import UserError
from ..records import Problem, TrainingExample, atomic_write_json, read_records, write_records
from ..rundir import RunDir
from ..stages import Stage
from ..tasks import get_benchmark
from ..tasks.stage import BenchmarkSelection, benchmark_inputs, load_benchmarks
from ..ui import note, progress_bar
from .sets import training_data, training_data_name, training_data_step

_WORD = re.compile(r"\w+")
MIN_TEMPLATE_PROBLEMS = 3  # an n-gram in this many problems or fewer is never called template text


def words(text: str) -> list[str]:
    return _WORD.findall(text.casefold())


def ngrams(tokens: Sequence[str], n: int) -> Iterator[tuple[str, ...]]:
    return (tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def prompt_text(messages) -> str:
    return "\n".join(m.content for m in messages if m.role != "assistant")


@dataclass(frozen=True)
class Overlap:
    row: int  # row of the training data
    problem_id: str  # the training example's problem id
    benchmark_problem: str  # id of the benchmark problem it overlaps
    ngram: str  # the first shared n-gram, as words


class BenchmarkIndex:
    """The n-grams of benchmark problems, each with the problems that contain it."""

    def __init__(self, benchmarks: dict[str, list[Problem]], n: int, template_share: float):
        self.problems: dict[tuple[str, ...], list[str]] = defaultdict(list)
        for name, problems in benchmarks.items():
            benchmark = get_benchmark(name)
            holders: dict[tuple[str, ...], set[str]] = defaultdict(set)
            for problem in problems:
                tokens = words(benchmark.question(problem))
                for gram in ngrams(tokens, n) if len(tokens) >= n else [tuple(tokens)]:
                    holders[gram].add(problem.id)
            template = max(MIN_TEMPLATE_PROBLEMS, template_share * len(problems))
            for gram, ids in holders.items():
                if gram and len(ids) <= template:
                    self.problems[gram].extend(sorted(ids))
        # Problems shorter than n words are indexed whole, so texts are also cut into those lengths.
        self.lengths = sorted({len(gram) for gram in self.problems})

    def overlaps(self, text: str) -> dict[str, tuple[str, ...]]:
        """Benchmark problems sharing an n-gram with `text`, each with the first shared n-gram."""
        tokens = words(text)
        found: dict[str, tuple[str, ...]] = {}
        for length in self.lengths:
            for gram in ngrams(tokens, length):
                for problem_id in self.problems.get(gram, ()):
                    found.setdefault(problem_id, gram)
        return found


def find_overlaps(
    examples: Sequence[TrainingExample], index: BenchmarkIndex, check: Sequence[str], progress=None
) -> list[Overlap]:
    overlaps = []
    for row, example in enumerate(examples):
        text = "\n".join(
            prompt_text(example.messages) if part == "prompt" else example.completion for part in check
        )
        for problem_id, gram in index.overlaps(text).items():
            overlaps.append(Overlap(row, example.problem_id, problem_id, " ".join(gram)))
        if progress:
            progress(1)
    return overlaps


class ContaminationCheck(BenchmarkSelection):
    """What counts as an overlap with the evaluation benchmarks (the `decontaminate` stage and operator)."""

    benchmarks: list[str] = Field(min_length=1, description="evaluation benchmarks to compare with")
    ngram: int = Field(8, ge=1, description="n-gram length in words")
    check: list[Literal["prompt", "completion"]] = Field(
        ["prompt"], min_length=1, description="which parts of each training example to compare"
    )
    template_share: float = Field(
        0.1,
        gt=0,
        le=1,
        description="an n-gram in more than this share of a benchmark's problems (and in more than "
        f"{MIN_TEMPLATE_PROBLEMS}) is template text and ignored",
    )


class DecontaminateConfig(ContaminationCheck):
    name: str = Field(description="output name: curated/<name> and decontamination/<name>.json")
    data: str = Field(
        description="a curated set of this run (curated/<name>), or a .jsonl/.parquet file of training examples"
    )
    drop: bool = Field(True, description="drop the overlapping examples (off: only report them)")


def run_decontaminate(cfg: DecontaminateConfig, run: RunDir, overwrite: bool) -> None:
    data_path, data_fingerprint = training_data(cfg.data, run)
    benchmarks = load_benchmarks(cfg)
    inputs = {"data": data_fingerprint, **benchmark_inputs(benchmarks)}

    def body(_fingerprint: str) -> dict:
        examples = read_records(data_path, TrainingExample)
        if not examples:
            raise UserError(
                f"decontaminate:{cfg.name}: {training_data_name(cfg.data, run, data_path)} holds no examples"
            )
        index = BenchmarkIndex(benchmarks, cfg.ngram, cfg.template_share)
        with progress_bar(f"decontaminate {cfg.name}", total=len(examples), unit="examples") as bar:
            overlaps = find_overlaps(examples, index, cfg.check, progress=bar.advance)
        contaminated = {o.row for o in overlaps}
        kept = [e for row, e in enumerate(examples) if not (cfg.drop and row in contaminated)]
        write_records(run.curated(cfg.name), kept, TrainingExample)
        benchmark_of = {p.id: name for name, ps in benchmarks.items() for p in ps}
        stats = {
            "data": str(data_path),
            "input": len(examples),
            "ngram": cfg.ngram,
            "benchmarks": {name: len(ps) for name, ps in benchmarks.items()},
            "contaminated": len(contaminated),
            "by_benchmark": {
                name: n
                for name in benchmarks
                if (n := len({o.row for o in overlaps if benchmark_of[o.benchmark_problem] == name}))
            },
            "dropped": len(examples) - len(kept),
        }
        atomic_write_json(run.decontamination(cfg.name), {**stats, "overlaps": [asdict(o) for o in overlaps]})
        return stats

    outputs = [run.curated(cfg.name), run.decontamination(cfg.name)]
    stats = run.step(f"curate:{cfg.name}", cfg, inputs, body, outputs=outputs, overwrite=overwrite)["stats"]
    note(
        f"decontaminate:{cfg.name}: {stats['contaminated']} of {stats['input']} examples share a "
        f"{cfg.ngram}-gram with {', '.join(stats['benchmarks'])} {stats['by_benchmark']}; dropped {stats['dropped']}"
    )


STAGE = Stage(
    "decontaminate",
    DecontaminateConfig,
    run_decontaminate,
    "find training examples sharing an n-gram with evaluation benchmarks, and drop them",
    # The cleaned set is a curated set like any other: `train` reads it by name.
    produces=lambda cfg: [f"curate:{cfg.name}"],
    requires=lambda cfg: training_data_step(cfg.data),
)
