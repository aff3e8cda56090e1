"""`curate`: turn graded traces into a training set, recording what was kept and dropped.

Operators here: rejection sampling by label, a cap of traces per problem, stripping the
reasoning to build an answer-only baseline set from the very same traces, and pairing a correct
with an incorrect trace of the same problem (the data of DPO, REDI and AFT).
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from pathlib import Path
from typing import Literal

from pydantic import Field

from ..errors import UserError
from ..records import GradedTrace, Label, PairExample, TrainingExample, read_records, write_records
from ..rundir import RunDir
from ..stages import Stage, StageConfig
from ..tasks.stage import problems_by_id
from ..ui import note


class CurateConfig(StageConfig):
    name: str = Field(description="output name: curated/<name>")
    traces: str = Field(description="graded traces to select from (graded/<name>)")
    keep: list[Label] = Field(
        ["correct"], min_length=1, description="labels to keep (rejection sampling keeps correct)"
    )
    reasoning: Literal["keep", "drop"] = Field(
        "keep", description="drop: train on the final answer only, without the reasoning block"
    )
    max_per_problem: int | None = Field(
        None, ge=1, description="keep at most this many traces (pairs, with pairs: true) per problem"
    )
    pairs: bool = Field(
        False,
        description="write (chosen = correct, rejected = incorrect) pairs of the same problem instead of "
        "single examples; `keep` is then ignored",
    )


def training_data(data: str, run: RunDir) -> tuple[Path, str]:
    """The file of a set of training examples and its fingerprint: a curated set of the run (with
    its step's fingerprint) or a .jsonl/.parquet file (with its content hash)."""
    if run.curated(data).exists():
        return run.curated(data), run.finished_step(f"curate:{data}")["fingerprint"]
    path = Path(data).expanduser()
    if path.suffix in (".jsonl", ".parquet") and path.exists():
        return path, hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    raise UserError(
        f"training data {data!r}: not a curated set of {run.root} nor an existing .jsonl/.parquet file"
    )


def training_data_step(data: str) -> dict[str, str]:
    """What a stage reading `data` requires: the step that curates it, unless it is a file."""
    return {} if Path(data).expanduser().is_file() else {"data": f"curate:{data}"}


def curate(
    graded: list[GradedTrace], problems: dict, cfg: CurateConfig
) -> tuple[list[TrainingExample], dict]:
    kept: list[TrainingExample] = []
    per_problem: Counter = Counter()
    dropped: dict[str, Counter] = defaultdict(Counter)
    for trace in graded:
        if trace.label not in cfg.keep:
            dropped[f"label {trace.label}"][trace.task] += 1
            continue
        if cfg.max_per_problem and per_problem[trace.problem_id] >= cfg.max_per_problem:
            dropped["over max_per_problem"][trace.task] += 1
            continue
        per_problem[trace.problem_id] += 1
        completion = trace.final if cfg.reasoning == "drop" else trace.completion
        problem = problems[trace.problem_id]
        kept.append(
            TrainingExample(
                problem_id=trace.problem_id,
                task=trace.task,
                messages=problem.messages,
                completion=completion,
                sample_idx=trace.sample_idx,
            )
        )
    stats = {
        "input": len(graded),
        "kept": dict(Counter(e.task for e in kept)),
        "dropped": {reason: dict(counts) for reason, counts in dropped.items()},
        "problems": len(per_problem),
    }
    return kept, stats


def pair(graded: list[GradedTrace], problems: dict, cfg: CurateConfig) -> tuple[list[PairExample], dict]:
    """The i-th correct with the i-th incorrect trace of each problem (in sample order), as REDI pairs
    its first positive with its first negative; problems without both labels give no pair."""
    by_problem: dict[str, dict[str, list[GradedTrace]]] = defaultdict(lambda: defaultdict(list))
    for trace in sorted(graded, key=lambda t: (t.problem_id, t.sample_idx)):
        by_problem[trace.problem_id][trace.label].append(trace)
    pairs: list[PairExample] = []
    unpaired: Counter = Counter()
    for problem_id, labels in by_problem.items():
        matched = list(zip(labels["correct"], labels["incorrect"], strict=False))[: cfg.max_per_problem]
        if not matched:
            unpaired[problems[problem_id].task] += 1
        for chosen, rejected in matched:
            reasoning = cfg.reasoning == "keep"
            pairs.append(
                PairExample(
                    problem_id=problem_id,
                    task=chosen.task,
                    messages=problems[problem_id].messages,
                    chosen=chosen.completion if reasoning else chosen.final,
                    rejected=rejected.completion if reasoning else rejected.final,
                )
            )
    stats = {
        "input": len(graded),
        "kept": dict(Counter(p.task for p in pairs)),
        "dropped": {"problems without both a correct and an incorrect trace": dict(unpaired)},
        "problems": len(by_problem) - sum(unpaired.values()),
    }
    return pairs, stats


def run_curate(cfg: CurateConfig, run: RunDir, overwrite: bool) -> None:
    inputs = {"graded": run.finished_step(f"verify:{cfg.traces}")["fingerprint"]}

    def body(_fingerprint: str) -> dict:
        graded = read_records(run.graded(cfg.traces), GradedTrace)
        if cfg.pairs:
            pairs, stats = pair(graded, problems_by_id(run), cfg)
            write_records(run.curated(cfg.name), pairs, PairExample)
        else:
            examples, stats = curate(graded, problems_by_id(run), cfg)
            write_records(run.curated(cfg.name), examples, TrainingExample)
        return stats

    outputs = [run.curated(cfg.name)]
    stats = run.step(f"curate:{cfg.name}", cfg, inputs, body, outputs=outputs, overwrite=overwrite)["stats"]
    note(
        f"curate:{cfg.name}: kept {sum(stats['kept'].values())} of {stats['input']} traces {stats['kept']}, dropped {stats['dropped']}"
    )


STAGE = Stage(
    "curate",
    CurateConfig,
    run_curate,
    "select graded traces into a training set",
    produces=lambda cfg: [f"curate:{cfg.name}"],
    requires=lambda cfg: {"traces": f"verify:{cfg.traces}"},
)
