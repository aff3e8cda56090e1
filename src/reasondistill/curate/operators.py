"""Curation operators: each takes the traces still in the pool and returns the ones it keeps, with a
reason for every one it drops (the `curate` stage writes both down, row by row).

In a recipe they are a list under `curate.ops`, applied in order, each written as its name with its
options (`- dedup: {near: 0.8}`):

    difficulty     pass rate over n samples (or the benchmark's own level) → a level; keep a range
    length         per-trace token limits and a total token budget
    mix            long : short (or teacher A : teacher B) by example count, as Mix Distillation does
    dedup          exact and MinHash near-duplicate removal, of completions or of problems
    diverse        the k most distinct traces of each problem (farthest-first, DED)
    decontaminate  drop what shares an n-gram with an evaluation benchmark
    select         N problems, balanced over task and difficulty strata, diverse within each (DED)
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Literal

from pydantic import Field, PrivateAttr, model_validator

from ..config import StageConfig
from ..errors import UserError
from ..modelref import required_steps, resolve_model
from ..records import GradedTrace, Problem, read_records
from ..rundir import RunDir
from ..tasks.selection import benchmark_inputs, load_benchmarks
from .decontaminate import BenchmarkIndex, ContaminationCheck, prompt_text
from .similarity import NearDuplicateIndex, exact_key, farthest_first, jaccard, shingles, word_edit_distance


@dataclass
class Candidate:
    """A graded trace in the pool, with the graded set it came from."""

    trace: GradedTrace
    origin: str
    problem: Problem

    @property
    def name(self) -> str:
        return f"{self.origin}:{self.trace.problem_id}#{self.trace.sample_idx}"


@dataclass
class Drop:
    candidate: Candidate
    reason: str  # shared by many rows, for counts: "over max_tokens"
    detail: str = ""  # this row's specifics: "412 tokens > 300"


@dataclass
class Context:
    run: RunDir
    everything: list[Candidate]  # the input before any operator: pass rates count every sample
    seed: int
    # Per problem id: what operators learnt about it (pass_rate, samples, difficulty), for later ones
    # and for the decision log.
    notes: dict[str, dict] = field(default_factory=lambda: defaultdict(dict))


Outcome = tuple[list[Candidate], list[Drop]]


class Op(StageConfig, ABC):
    @abstractmethod
    def apply(self, pool: list[Candidate], ctx: Context) -> Outcome:
        """The candidates kept, and a Drop for each one dropped."""

    def inputs(self, run: RunDir) -> dict[str, str]:
        """Fingerprints of what the operator reads besides the traces, for the step's fingerprint."""
        return {}

    def requires(self) -> dict[str, str | tuple[str, ...]]:
        """Steps the operator needs: {option: step key}."""
        return {}

    def graded_sets(self) -> dict[str, str]:
        """Graded sets of the run the operator reads besides the curated traces, by option: the
        `curate` stage adds their fingerprints to the step's and requires the steps that write them."""
        return {}


def _by_problem(pool: list[Candidate]) -> dict[str, list[Candidate]]:
    groups: dict[str, list[Candidate]] = defaultdict(list)
    for candidate in pool:
        groups[candidate.trace.problem_id].append(candidate)
    return groups


def _split(pool: list[Candidate], keep: Callable[[Candidate], bool | str]) -> Outcome:
    """`keep` returns True, or the reason for dropping."""
    kept, dropped = [], []
    for candidate in pool:
        verdict = keep(candidate)
        if verdict is True:
            kept.append(candidate)
        else:
            dropped.append(Drop(candidate, verdict))
    return kept, dropped


class Difficulty(Op):
    op: Literal["difficulty"] = "difficulty"
    source: Literal["pass_rate", "level"] = Field(
        "pass_rate",
        description="pass_rate: share of correct samples per problem, binned into levels; "
        "level: the problem's own difficulty (a benchmark's level, a testbed task's digits)",
    )
    pass_rate_from: str | None = Field(
        None,
        description="graded set whose samples give the pass rate (e.g. the student's, as DED does); "
        "default: every trace of the curated sets, whatever its label",
    )
    min_pass_rate: float = Field(0.0, ge=0, le=1, description="drop problems solved less often than this")
    max_pass_rate: float = Field(
        1.0, ge=0, le=1, description="drop problems solved more often than this (DED drops the easy ones)"
    )
    bins: int = Field(
        3,
        ge=1,
        description="pass-rate levels: pass rate in [1-k/bins, 1-(k-1)/bins) is level k (higher = harder)",
    )
    keep_levels: list[int] | None = Field(None, description="keep only these levels")

    def graded_sets(self) -> dict[str, str]:
        return {"pass_rate_from": self.pass_rate_from} if self.pass_rate_from else {}

    def level(self, pass_rate: float) -> int:
        return min(self.bins, max(1, self.bins - int(pass_rate * self.bins)))

    def apply(self, pool: list[Candidate], ctx: Context) -> Outcome:
        if self.source == "level":
            for candidate in pool:
                ctx.notes[candidate.trace.problem_id]["difficulty"] = candidate.problem.difficulty
        else:
            samples = (
                read_records(ctx.run.graded(self.pass_rate_from), GradedTrace)
                if self.pass_rate_from
                else [c.trace for c in ctx.everything]
            )
            correct, total = Counter(), Counter()
            for trace in samples:
                total[trace.problem_id] += 1
                correct[trace.problem_id] += trace.label == "correct"
            for problem_id in {c.trace.problem_id for c in pool} & total.keys():
                rate = correct[problem_id] / total[problem_id]
                ctx.notes[problem_id].update(
                    pass_rate=rate, samples=total[problem_id], difficulty=self.level(rate)
                )
        where = f" in {self.pass_rate_from}" if self.pass_rate_from else ""

        def keep(c: Candidate) -> bool | str:
            note = ctx.notes[c.trace.problem_id]
            if note.get("difficulty") is None:
                return (
                    "no native difficulty level"
                    if self.source == "level"
                    else f"no samples{where} to estimate the pass rate"
                )
            if "pass_rate" in note and not self.min_pass_rate <= note["pass_rate"] <= self.max_pass_rate:
                return (
                    "pass rate below min_pass_rate"
                    if note["pass_rate"] < self.min_pass_rate
                    else "pass rate above max_pass_rate"
                )
            if self.keep_levels is not None and note["difficulty"] not in self.keep_levels:
                return "level not in keep_levels"
            return True

        return _split(pool, keep)


class LengthBudget(Op):
    op: Literal["length"] = "length"
    min_tokens: int = Field(0, ge=0, description="drop traces shorter than this")
    max_tokens: int | None = Field(None, ge=1, description="drop traces longer than this")
    total_tokens: int | None = Field(
        None,
        ge=1,
        description="token budget of the whole set: traces are taken one per problem per round (each "
        "problem's first before any second), skipping those that no longer fit",
    )
    tokenizer: str | None = Field(
        None,
        description="count tokens with this model's tokenizer (e.g. the student's; a model reference) "
        "instead of the teacher's count stored with each trace",
    )
    _count: Callable[[str], int] | None = PrivateAttr(None)

    def inputs(self, run: RunDir) -> dict[str, str]:
        return {"tokenizer": resolve_model(self.tokenizer, run).fingerprint} if self.tokenizer else {}

    def requires(self) -> dict[str, str | tuple[str, ...]]:
        return required_steps("ops.length.tokenizer", [self.tokenizer]) if self.tokenizer else {}

    def tokens(self, candidate: Candidate, run: RunDir) -> int:
        if not self.tokenizer:
            return candidate.trace.completion_tokens
        if self._count is None:
            from ..models import load_tokenizer

            tokenizer = load_tokenizer(resolve_model(self.tokenizer, run).path, chat_template=False)
            self._count = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])
        return self._count(candidate.trace.completion)

    def apply(self, pool: list[Candidate], ctx: Context) -> Outcome:
        length = {id(c): self.tokens(c, ctx.run) for c in pool}

        def within_limits(c: Candidate) -> bool | str:
            if length[id(c)] < self.min_tokens:
                return "under min_tokens"
            if self.max_tokens is not None and length[id(c)] > self.max_tokens:
                return "over max_tokens"
            return True

        kept, dropped = _split(pool, within_limits)
        if self.total_tokens is None:
            return kept, dropped
        used, chosen = 0, set()
        for candidate in _round_robin(_by_problem(kept).values()):
            if used + length[id(candidate)] <= self.total_tokens:
                used += length[id(candidate)]
                chosen.add(id(candidate))
        dropped += [Drop(c, "over the total token budget") for c in kept if id(c) not in chosen]
        return [c for c in kept if id(c) in chosen], dropped


def _round_robin(groups) -> list[Candidate]:
    """The first of every group, then the second of every group, and so on."""
    queues = [list(g) for g in groups]
    order = []
    for depth in range(max(map(len, queues), default=0)):
        order += [q[depth] for q in queues if depth < len(q)]
    return order


class Mix(Op):
    op: Literal["mix"] = "mix"
    ratio: dict[str, float] = Field(
        min_length=1,
        description="examples per group, relative: {long: 1, short: 4} with long_tokens, else by graded set "
        "({big-teacher: 1, small-teacher: 4})",
    )
    long_tokens: int | None = Field(
        None, ge=1, description="groups long / short: a trace over this many tokens is long"
    )
    total: int | None = Field(
        None, ge=1, description="examples in the mix (default: as many as the scarcest group allows)"
    )

    @model_validator(mode="after")
    def _groups(self) -> Mix:
        if any(weight <= 0 for weight in self.ratio.values()):
            raise ValueError("ratio: every weight must be positive")
        if self.long_tokens is not None and not set(self.ratio) <= {"long", "short"}:
            raise ValueError("ratio: with long_tokens the groups are `long` and `short`")
        return self

    def group(self, candidate: Candidate) -> str:
        if self.long_tokens is None:
            return candidate.origin
        return "long" if candidate.trace.completion_tokens > self.long_tokens else "short"

    def apply(self, pool: list[Candidate], ctx: Context) -> Outcome:
        if self.long_tokens is None and (unknown := set(self.ratio) - {c.origin for c in ctx.everything}):
            raise UserError(
                f"mix: ratio names {sorted(unknown)[0]!r}, which is not one of the curated graded sets"
            )
        groups: dict[str, list[Candidate]] = defaultdict(list)
        for candidate in pool:
            groups[self.group(candidate)].append(candidate)
        weight = sum(self.ratio.values())
        feasible = min(int(len(groups[g]) * weight / w + 1e-9) for g, w in self.ratio.items())
        total = self.total or feasible
        targets = _largest_remainder({g: total * w / weight for g, w in self.ratio.items()}, total)
        short = [g for g in self.ratio if targets[g] > len(groups[g])]
        if short:
            g = short[0]
            raise UserError(
                f"mix: a total of {total} at ratio {self.ratio} needs {targets[g]} {g!r} examples; "
                f"the pool has {len(groups[g])} (at most {feasible} in all)"
            )
        rng = random.Random(ctx.seed)
        chosen = set()
        for g in self.ratio:
            by_problem = list(_by_problem(groups[g]).values())
            rng.shuffle(by_problem)
            chosen.update(id(c) for c in _round_robin(by_problem)[: targets[g]])
        return _split(
            pool,
            lambda c: (
                True
                if id(c) in chosen
                else ("not in a mixed group" if self.group(c) not in self.ratio else "over its group's share")
            ),
        )


def _largest_remainder(shares: dict[str, float], total: int) -> dict[str, int]:
    """Integers summing to `total`, each within 1 of its share."""
    counts = {k: int(v) for k, v in shares.items()}
    for k in sorted(shares, key=lambda k: -(shares[k] - counts[k]))[: total - sum(counts.values())]:
        counts[k] += 1
    return counts


class Dedup(Op):
    op: Literal["dedup"] = "dedup"
    compare: Literal["completion", "prompt"] = Field(
        "completion",
        description="completion: duplicate traces; prompt: duplicate problems (all their traces go)",
    )
    within: Literal["corpus", "problem"] = Field(
        "corpus", description="compare across the whole set, or only the traces of one problem"
    )
    exact: bool = Field(True, description="drop texts equal up to case and whitespace")
    near: float | None = Field(
        0.8,
        gt=0,
        le=1,
        description="drop texts whose word-shingle Jaccard similarity reaches this (None: off)",
    )
    shingle: int = Field(5, ge=1, description="words per shingle")
    num_perm: int = Field(128, ge=16, description="MinHash permutations (LSH candidate recall)")

    @model_validator(mode="after")
    def _prompts_across_problems(self) -> Dedup:
        if self.compare == "prompt" and self.within == "problem":
            raise ValueError("compare: prompt compares problems with each other; use within: corpus")
        return self

    def apply(self, pool: list[Candidate], ctx: Context) -> Outcome:
        # Problems are compared through their first trace, and drop or keep all their traces together.
        units = list(_by_problem(pool).values()) if self.compare == "prompt" else [[c] for c in pool]
        text = (
            (lambda c: prompt_text(c.problem.messages))
            if self.compare == "prompt"
            else (lambda c: c.trace.completion)
        )
        seen: dict[str, dict[str, str]] = defaultdict(dict)  # scope -> exact key -> first holder
        # One problem's traces are few: compared exhaustively. The corpus goes through MinHash LSH.
        near = defaultdict(
            lambda: NearDuplicateIndex(
                self.near, self.shingle, self.num_perm, exhaustive=self.within == "problem"
            )
        )
        verdicts: dict[int, Drop] = {}
        for unit in units:
            first = unit[0]
            scope = first.trace.problem_id if self.within == "problem" else ""
            body = text(first)
            drop = None
            if self.exact and (holder := seen[scope].get(exact_key(body))):
                drop = ("exact duplicate", f"same {self.compare} as {holder}")
            elif self.near is not None and (match := near[scope].find(body)):
                drop = ("near duplicate", f"Jaccard {match[1]:.2f} with {match[0]}")
            if drop:
                verdicts.update({id(c): Drop(c, *drop) for c in unit})
                continue
            seen[scope].setdefault(exact_key(body), first.name)
            if self.near is not None:
                near[scope].add(first.name, body)
        return [c for c in pool if id(c) not in verdicts], [
            verdicts[id(c)] for c in pool if id(c) in verdicts
        ]


class Diverse(Op):
    op: Literal["diverse"] = "diverse"
    per_problem: int = Field(ge=1, description="traces to keep per problem: the most distinct ones")
    distance: Literal["edit", "shingles"] = Field(
        "edit",
        description="edit: Levenshtein over words (DED); shingles: 1 - Jaccard of word shingles (faster)",
    )
    shingle: int = Field(3, ge=1, description="words per shingle (distance: shingles)")

    def apply(self, pool: list[Candidate], ctx: Context) -> Outcome:
        chosen = set()
        for traces in _by_problem(pool).values():
            texts = [c.trace.completion for c in traces]
            if self.distance == "edit":
                distance = lambda i, j, texts=texts: word_edit_distance(texts[i], texts[j])  # noqa: E731
            else:
                sets = [shingles(t, self.shingle) for t in texts]
                distance = lambda i, j, sets=sets: 1 - jaccard(sets[i], sets[j])  # noqa: E731
            chosen.update(id(traces[i]) for i in farthest_first(len(traces), self.per_problem, distance))
        return _split(pool, lambda c: id(c) in chosen or "not among its problem's most distinct traces")


class Decontaminate(Op, ContaminationCheck):
    op: Literal["decontaminate"] = "decontaminate"
    _benchmarks: dict | None = PrivateAttr(None)

    def benchmark_problems(self) -> dict[str, list[Problem]]:
        if self._benchmarks is None:
            self._benchmarks = load_benchmarks(self)
        return self._benchmarks

    def inputs(self, run: RunDir) -> dict[str, str]:
        return benchmark_inputs(self.benchmark_problems())

    def apply(self, pool: list[Candidate], ctx: Context) -> Outcome:
        index = BenchmarkIndex(self.benchmark_problems(), self.ngram, self.template_share)
        kept, dropped = [], []
        for c in pool:
            text = "\n".join(
                prompt_text(c.problem.messages) if part == "prompt" else c.trace.completion
                for part in self.check
            )
            if overlaps := index.overlaps(text):
                problem_id, gram = next(iter(overlaps.items()))
                dropped.append(
                    Drop(c, "shares an n-gram with a benchmark", f"{problem_id}: {' '.join(gram)!r}")
                )
            else:
                kept.append(c)
        return kept, dropped


class Select(Op):
    op: Literal["select"] = "select"
    problems: int = Field(ge=1, description="problems to keep (all their remaining traces stay)")
    by: list[Literal["task", "difficulty"]] = Field(
        ["task", "difficulty"],
        description="strata to balance; difficulty is the level set by a `difficulty` operator, else the problem's own",
    )
    allocation: Literal["balanced", "proportional"] = Field(
        "balanced",
        description="balanced: strata as equal as their sizes allow; proportional: in proportion to their sizes",
    )
    diversity: bool = Field(
        True,
        description="within a stratum pick problems farthest apart (word-shingle Jaccard), else at random",
    )
    shingle: int = Field(3, ge=1, description="words per shingle for the problem distance")

    def stratum(self, candidate: Candidate, ctx: Context) -> tuple:
        level = ctx.notes[candidate.trace.problem_id].get("difficulty", candidate.problem.difficulty)
        return tuple(candidate.problem.task if key == "task" else level for key in self.by)

    def apply(self, pool: list[Candidate], ctx: Context) -> Outcome:
        strata: dict[tuple, list[Problem]] = defaultdict(list)
        for traces in _by_problem(pool).values():
            strata[self.stratum(traces[0], ctx)].append(traces[0].problem)
        keys = sorted(strata, key=str)
        sizes = {k: len(strata[k]) for k in keys}
        quota = (
            _balanced(sizes, self.problems)
            if self.allocation == "balanced"
            else _proportional(sizes, self.problems)
        )
        rng = random.Random(ctx.seed)
        chosen = set()
        for key in keys:
            problems, m = strata[key], quota[key]
            if self.diversity:
                sets = [shingles(prompt_text(p.messages), self.shingle) for p in problems]
                picks = farthest_first(
                    len(problems),
                    m,
                    lambda i, j, sets=sets: 1 - jaccard(sets[i], sets[j]),
                    start=rng.randrange(len(problems)),
                )
            else:
                picks = rng.sample(range(len(problems)), m)
            chosen.update(problems[i].id for i in picks)
        return _split(pool, lambda c: c.trace.problem_id in chosen or "problem not selected")


def _balanced(sizes: dict, total: int) -> dict:
    """Water-filling: every stratum gets an equal share, a small one all it has and the rest shared out."""
    quota, left = {}, min(total, sum(sizes.values()))
    ordered = sorted(sizes, key=lambda k: (sizes[k], str(k)))
    for n, key in enumerate(ordered):
        quota[key] = min(sizes[key], left // (len(ordered) - n))
        left -= quota[key]
    return quota


def _proportional(sizes: dict, total: int) -> dict:
    total = min(total, sum(sizes.values()))
    return _largest_remainder({k: total * n / sum(sizes.values()) for k, n in sizes.items()}, total)


Operator = Annotated[
    Difficulty | LengthBudget | Mix | Dedup | Diverse | Decontaminate | Select, Field(discriminator="op")
]
OPERATORS = ("difficulty", "length", "mix", "dedup", "diverse", "decontaminate", "select")
