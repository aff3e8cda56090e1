"""Curation of a pool of graded traces into training examples or pairs, with a decision on every trace.

In order: rejection sampling by label (`keep`), the operators of `ops` (operators.py: difficulty,
length budgets, long/short mixing, dedup, diversity, decontamination, stratified selection), a cap
of traces per problem, then either single examples (optionally without their reasoning: an
answer-only baseline from the very same traces) or pairs of a correct and an incorrect trace of the
same problem (the data of DPO, REDI and AFT). Every input trace gets a `CurationDecision` saying
whether it was kept and, if not, which step dropped it and why.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Literal

from pydantic import Field, field_validator, model_validator

from ..config import StageConfig
from ..records import Label, PairExample, Record, TrainingExample
from ..rundir import RunDir
from .operators import OPERATORS, Candidate, Context, Drop, Operator


class CurationOptions(StageConfig):
    """How a pool of graded traces is curated (the `curate` stage's options besides its inputs and output)."""

    keep: list[Label] | None = Field(
        None,
        min_length=1,
        description="labels to keep (rejection sampling); default [correct], or [correct, incorrect] with pairs",
    )
    ops: list[Operator] = Field(
        [],
        description=f"curation operators applied in order after `keep`, each as `- name: {{options}}`: {', '.join(OPERATORS)}",
    )
    reasoning: Literal["keep", "drop"] = Field(
        "keep", description="drop: train on the final answer only, without the reasoning block"
    )
    max_per_problem: int | None = Field(
        None, ge=1, description="keep at most this many traces (pairs, with pairs: true) per problem"
    )
    pairs: bool = Field(
        False,
        description="write (chosen = correct, rejected = incorrect) pairs of the same problem instead of single examples",
    )
    seed: int = Field(0, description="seed of the operators that choose at random (mix, select)")

    @field_validator("ops", mode="before")
    @classmethod
    def _named_operators(cls, ops):
        """`- dedup: {near: 0.8}` in a recipe is `{op: dedup, near: 0.8}` to pydantic."""
        if not isinstance(ops, list):
            return ops
        named = []
        for op in ops:
            if isinstance(op, dict) and len(op) == 1 and "op" not in op:
                ((name, options),) = op.items()
                if not isinstance(options or {}, dict):
                    raise ValueError(f"{name}: expected a mapping of options, got {options!r}")
                op = {"op": name, **(options or {})}
            named.append(op)
        return named

    @model_validator(mode="after")
    def _labels_to_keep(self) -> CurationOptions:
        # Resolved here, so that the default and the same labels written out are one setting.
        if self.keep is None:
            self.keep = ["correct", "incorrect"] if self.pairs else ["correct"]
        if self.pairs and not {"correct", "incorrect"} <= set(self.keep):
            raise ValueError("pairs: keep must include both correct and incorrect")
        return self


class CurationDecision(Record):
    """One input trace and what curation did with it (curation/<name>.parquet)."""

    origin: str  # the graded set it came from
    problem_id: str
    sample_idx: int
    task: str
    label: Label
    completion_tokens: int
    kept: bool
    op: str | None  # the step that dropped it: keep, an operator, max_per_problem or pairs
    reason: str | None
    detail: str | None
    pass_rate: float | None  # set by a `difficulty` operator
    difficulty: int | None


def run_operators(
    options: CurationOptions, candidates: list[Candidate], run: RunDir
) -> tuple[list[Candidate], list[dict], dict[int, tuple[str, Drop]], dict[str, dict]]:
    """Apply keep, the operators and the cap in order. Returns the surviving pool, one summary per
    step, (step, Drop) by id of each dropped candidate, and what the operators noted per problem."""
    ctx = Context(run=run, everything=candidates, seed=options.seed)
    steps = [("keep", lambda pool, _ctx: _keep_labels(pool, options.keep))]
    steps += [(op.op, op.apply) for op in options.ops]
    if options.max_per_problem and not options.pairs:
        steps.append(("max_per_problem", lambda pool, _ctx: _cap(pool, options.max_per_problem)))
    pool, summaries, dropped = candidates, [], {}
    for name, apply in steps:
        kept, drops = apply(pool, ctx)
        summaries.append(
            {
                "op": name,
                "input": len(pool),
                "kept": len(kept),
                "dropped": dict(Counter(d.reason for d in drops)),
            }
        )
        dropped.update({id(d.candidate): (name, d) for d in drops})
        pool = kept
    return pool, summaries, dropped, ctx.notes


def _keep_labels(pool: list[Candidate], labels: list[str]) -> tuple[list[Candidate], list[Drop]]:
    kept = [c for c in pool if c.trace.label in labels]
    return kept, [Drop(c, f"label {c.trace.label}") for c in pool if c.trace.label not in labels]


def _cap(pool: list[Candidate], cap: int) -> tuple[list[Candidate], list[Drop]]:
    seen: Counter = Counter()
    kept, dropped = [], []
    for c in pool:
        seen[c.trace.problem_id] += 1
        (
            kept.append(c)
            if seen[c.trace.problem_id] <= cap
            else dropped.append(Drop(c, "over max_per_problem"))
        )
    return kept, dropped


def examples(pool: list[Candidate], options: CurationOptions, one_source: bool) -> list[TrainingExample]:
    """The pool as single training examples. With several graded sets (`one_source` false) a sample
    index no longer names one trace: it is left out, so that stored teacher log-probabilities are
    never joined with the wrong trace."""
    return [
        TrainingExample(
            problem_id=c.trace.problem_id,
            task=c.trace.task,
            messages=c.problem.messages,
            completion=c.trace.final if options.reasoning == "drop" else c.trace.completion,
            sample_idx=c.trace.sample_idx if one_source else None,
        )
        for c in pool
    ]


def pair(pool: list[Candidate], options: CurationOptions) -> tuple[list[PairExample], list[Drop]]:
    """The i-th correct with the i-th incorrect trace of each problem (in sample order), as REDI pairs
    its first positive with its first negative; traces left without a partner are dropped."""
    by_problem: dict[str, dict[str, list[Candidate]]] = defaultdict(lambda: defaultdict(list))
    for c in sorted(pool, key=lambda c: (c.trace.problem_id, c.trace.sample_idx)):
        by_problem[c.trace.problem_id][c.trace.label].append(c)
    pairs, used = [], set()
    for labels in by_problem.values():
        for chosen, rejected in list(zip(labels["correct"], labels["incorrect"], strict=False))[
            : options.max_per_problem
        ]:
            used.update((id(chosen), id(rejected)))
            reasoning = options.reasoning == "keep"
            pairs.append(
                PairExample(
                    problem_id=chosen.trace.problem_id,
                    task=chosen.trace.task,
                    messages=chosen.problem.messages,
                    chosen=chosen.trace.completion if reasoning else chosen.trace.final,
                    rejected=rejected.trace.completion if reasoning else rejected.trace.final,
                )
            )
    return pairs, [Drop(c, "no partner of the other label") for c in pool if id(c) not in used]


def curate_candidates(
    options: CurationOptions, candidates: list[Candidate], run: RunDir, one_source: bool
) -> tuple[list[TrainingExample] | list[PairExample], list[CurationDecision], dict]:
    """The curated records, the decision on every candidate, and the statistics for the manifest.

    `run` is what the operators read besides the pool (a `difficulty` operator's `pass_rate_from`
    set, a `length` operator's tokenizer trained in the run); `one_source`: the candidates come from
    one graded set, so a sample index names one trace (see `examples`)."""
    pool, summaries, dropped, notes = run_operators(options, candidates, run)
    if options.pairs:
        records, unpaired = pair(pool, options)
        summaries.append({"op": "pairs", "input": len(pool), "kept": len(pool) - len(unpaired), "pairs": len(records),
                          "dropped": dict(Counter(d.reason for d in unpaired))})  # fmt: skip
        dropped.update({id(d.candidate): ("pairs", d) for d in unpaired})
    else:
        records = examples(pool, options, one_source)
    decisions = []
    for c in candidates:
        op, drop = dropped.get(id(c), (None, None))
        learnt = notes.get(c.trace.problem_id, {})
        decisions.append(
            CurationDecision(
                origin=c.origin, problem_id=c.trace.problem_id, sample_idx=c.trace.sample_idx, task=c.trace.task,
                label=c.trace.label, completion_tokens=c.trace.completion_tokens, kept=drop is None, op=op,
                reason=drop and drop.reason, detail=drop and drop.detail or None,
                pass_rate=learnt.get("pass_rate"), difficulty=learnt.get("difficulty"),
            )
        )  # fmt: skip
    by_reason: dict[str, Counter] = defaultdict(Counter)
    for d in decisions:
        if not d.kept:
            by_reason[f"{d.op}: {d.reason}" if d.op != "keep" else d.reason][d.task] += 1
    kept_rows = [d for d in decisions if d.kept]
    stats = {
        "input": len(candidates),
        "kept": dict(Counter(r.task for r in records)),
        "dropped": {reason: dict(counts) for reason, counts in by_reason.items()},
        "problems": len({d.problem_id for d in kept_rows}),
        "completion_tokens": sum(d.completion_tokens for d in kept_rows),
        "operators": summaries,
    }
    return records, decisions, stats
