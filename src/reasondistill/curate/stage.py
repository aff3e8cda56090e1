"""`curate`: turn graded traces into a training set, recording what was kept and dropped.

In order: rejection sampling by label (`keep`), the operators of `ops` (operators.py: difficulty,
length budgets, long/short mixing, dedup, diversity, decontamination, stratified selection), a cap
of traces per problem, then either single examples (optionally without their reasoning: an
answer-only baseline from the very same traces) or pairs of a correct and an incorrect trace of the
same problem (the data of DPO, REDI and AFT). Every input trace gets one row in
curation/<name>.parquet saying whether it was kept and, if not, which operator dropped it and why.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Literal

from pydantic import Field, field_validator, model_validator

from ..errors import UserError
from ..records import GradedTrace, Label, PairExample, Record, TrainingExample, read_records, write_records
from ..rundir import RunDir
from ..stages import Stage, StageConfig
from ..tasks.stage import problems_by_id
from ..ui import note
from .operators import OPERATORS, Candidate, Context, Drop, Operator
from .sets import graded_fingerprint, graded_requirement


class CurateConfig(StageConfig):
    name: str = Field(description="output name: curated/<name>")
    traces: list[str] = Field(
        min_length=1,
        description="graded traces to select from (graded/<name>), or several such sets (e.g. two teachers to mix)",
    )
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

    @field_validator("traces", mode="before")
    @classmethod
    def _one_set(cls, traces):
        return [traces] if isinstance(traces, str) else traces

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
    def _labels_to_keep(self) -> CurateConfig:
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
    cfg: CurateConfig, candidates: list[Candidate], run: RunDir
) -> tuple[list[Candidate], list[dict], dict[int, tuple[str, Drop]], dict[str, dict]]:
    """Apply keep, the operators and the cap in order. Returns the surviving pool, one summary per
    step, (step, Drop) by id of each dropped candidate, and what the operators noted per problem."""
    ctx = Context(run=run, everything=candidates, seed=cfg.seed)
    steps = [("keep", lambda pool, _ctx: _keep_labels(pool, cfg.keep))]
    steps += [(op.op, op.apply) for op in cfg.ops]
    if cfg.max_per_problem and not cfg.pairs:
        steps.append(("max_per_problem", lambda pool, _ctx: _cap(pool, cfg.max_per_problem)))
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


def examples(pool: list[Candidate], cfg: CurateConfig) -> list[TrainingExample]:
    # With several graded sets a sample index no longer names one trace: leave it out, so that stored
    # teacher log-probabilities are never joined with the wrong trace.
    one_source = len(cfg.traces) == 1
    return [
        TrainingExample(
            problem_id=c.trace.problem_id,
            task=c.trace.task,
            messages=c.problem.messages,
            completion=c.trace.final if cfg.reasoning == "drop" else c.trace.completion,
            sample_idx=c.trace.sample_idx if one_source else None,
        )
        for c in pool
    ]


def pair(pool: list[Candidate], cfg: CurateConfig) -> tuple[list[PairExample], list[Drop]]:
    """The i-th correct with the i-th incorrect trace of each problem (in sample order), as REDI pairs
    its first positive with its first negative; traces left without a partner are dropped."""
    by_problem: dict[str, dict[str, list[Candidate]]] = defaultdict(lambda: defaultdict(list))
    for c in sorted(pool, key=lambda c: (c.trace.problem_id, c.trace.sample_idx)):
        by_problem[c.trace.problem_id][c.trace.label].append(c)
    pairs, used = [], set()
    for labels in by_problem.values():
        for chosen, rejected in list(zip(labels["correct"], labels["incorrect"], strict=False))[
            : cfg.max_per_problem
        ]:
            used.update((id(chosen), id(rejected)))
            reasoning = cfg.reasoning == "keep"
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


def load_candidates(cfg: CurateConfig, run: RunDir) -> list[Candidate]:
    problems = problems_by_id(run)
    candidates = []
    for origin in cfg.traces:
        path = run.graded(origin)
        for row, trace in enumerate(read_records(path, GradedTrace)):
            if trace.problem_id not in problems:
                raise UserError(
                    f"{path} row {row}: problem_id {trace.problem_id!r} is not a problem of this run"
                )
            candidates.append(Candidate(trace, origin, problems[trace.problem_id]))
    return candidates


def curate(
    cfg: CurateConfig, run: RunDir
) -> tuple[list[TrainingExample] | list[PairExample], list[CurationDecision], dict]:
    """The curated records, the decision on every input trace, and the statistics for the manifest."""
    candidates = load_candidates(cfg, run)
    pool, summaries, dropped, notes = run_operators(cfg, candidates, run)
    if cfg.pairs:
        records, unpaired = pair(pool, cfg)
        summaries.append({"op": "pairs", "input": len(pool), "kept": len(pool) - len(unpaired), "pairs": len(records),
                          "dropped": dict(Counter(d.reason for d in unpaired))})  # fmt: skip
        dropped.update({id(d.candidate): ("pairs", d) for d in unpaired})
    else:
        records = examples(pool, cfg)
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


def run_curate(cfg: CurateConfig, run: RunDir, overwrite: bool) -> None:
    inputs = {f"graded:{name}": graded_fingerprint(run, name) for name in cfg.traces}
    for op in cfg.ops:
        inputs.update(op.inputs(run))

    def body(_fingerprint: str) -> dict:
        records, decisions, stats = curate(cfg, run)
        write_records(run.curated(cfg.name), records, PairExample if cfg.pairs else TrainingExample)
        write_records(run.curation(cfg.name), decisions, CurationDecision)
        return stats

    outputs = [run.curated(cfg.name), run.curation(cfg.name)]
    stats = run.step(f"curate:{cfg.name}", cfg, inputs, body, outputs=outputs, overwrite=overwrite)["stats"]
    steps = ", ".join(f"{s['op']} {s['input']}→{s['kept']}" for s in stats["operators"])
    what = "pairs" if cfg.pairs else "examples"
    note(
        f"curate:{cfg.name}: kept {sum(stats['kept'].values())} {what} from "
        f"{stats['input']} traces ({steps}); dropped {stats['dropped']}"
    )
    if not stats["kept"]:
        note(
            f"[yellow]warning:[/] curate:{cfg.name}: curated/{cfg.name} holds no {what}: {emptied_by(cfg, stats)}"
        )


def emptied_by(cfg: CurateConfig, stats: dict) -> str:
    """What left a curated set empty: its input, or the first step of curation that kept nothing."""
    if not stats["input"]:
        sets = ", ".join(f"graded/{name}" for name in cfg.traces)
        return f"{sets} {'holds' if len(cfg.traces) == 1 else 'hold'} no traces"
    step = next(s for s in stats["operators"] if s["input"] and not s["kept"])
    reasons = ", ".join(f"{reason} {count}" for reason, count in step["dropped"].items())
    return f"{step['op']} dropped the last {step['input']} traces ({reasons})"


def _requirements(cfg: CurateConfig) -> dict[str, str | tuple[str, ...]]:
    needs = {
        f"traces[{i}]" if len(cfg.traces) > 1 else "traces": graded_requirement(name)
        for i, name in enumerate(cfg.traces)
    }
    for op in cfg.ops:
        needs.update(op.requires())
    return needs


STAGE = Stage(
    "curate",
    CurateConfig,
    run_curate,
    "select graded traces into a training set",
    produces=lambda cfg: [f"curate:{cfg.name}"],
    requires=_requirements,
)
