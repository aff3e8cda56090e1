"""`rewrite`: a teacher rewrites graded traces with a difficulty-aware prompt (DAP), and every rewrite
is graded again against the gold answer.

DAP (LiteCoT, arXiv 2505.19716): the teacher judges how complex the problem is, picks one of three
thinking frameworks whose length fits it (simple: Analysis → Approach → Summary; moderately complex:
Analysis → Initial Approach → Reflection → Improvement → Summary; highly complex: Analysis → Problem
Decomposition → Sub-problem Processing → Integration → Overall Reflection → Final Optimization →
Summary) and writes two sections, **Thought** and **Solution**. The user message holds the problem
and its correct answer (`DAP_USER_TEMPLATE`); with `include_trace` also the original trace to
compress (the paper's "generate a long CoT, then rewrite"; the released pipeline makes one
answer-conditioned call, our default).

Where the rewrite goes. A trace keeps the `<think>` convention of verify/reasoning.py: the Thought
section becomes the reasoning block and the Solution section the final text,
`<think>\\n{Thought}\\n</think>\\n{Solution}`. The graders read only the final text, so the answer is
graded where DAP puts it (the end of the Solution); `curate reasoning: drop`, chunking and CWT see
the framework as the reasoning; a student trained on rewrites writes the same shape as one trained
on the original traces and is graded the same way in `eval`. When the teacher thinks first itself
(`<think>…</think>` before its answer, as R1 or Qwen3 do), that thinking is left out: DAP trains on
the structured answer, not on the teacher's hidden reasoning. A reply without a Solution section did
not follow the format and is dropped (`require_structure`; off: it is graded as written).

Every rewrite is graded with its task's grader (the `verify`/`eval` graders, `graders` overrides
included). graded/<name> holds only the rewrites graded correct, under the original's problem_id and
sample_idx; the others are dropped, counted by reason in the step's stats and listed in
graded/<name>.dropped.json: `cut` (token limit reached, or the teacher's own thinking never closed),
`unstructured` (no Solution section), `unparseable` (no answer in the expected form), `incorrect`
(the rewrite changed the answer), `failed` (the request failed after its retries; with
allow_failures). The teacher's raw replies are kept in resumable shards in traces/<name>/ (shared
machinery with `generate`: a killed job continues with no row lost or written twice).

A rewrite's `completion_tokens` is what the teacher generated (its own thinking included); the step's
`length` statistics count the stored texts before and after with one tokenizer (the teacher's, or
`tokenizer`; words with backend openai and no tokenizer), overall and per judged tier. A rewrite
keeps the original's sample_idx, so teacher log-probabilities stored for the original trace do not
describe it (`train` stops on a stored row that does not match its training tokens).
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from ..errors import UserError
from ..generate.backends import BackendOptions, backend_model, backend_requirements, open_generator
from ..generate.base import Completion, Generator, row_seed
from ..generate.shards import ShardedJob, ShardIndex, usage_totals
from ..generate.stage import (
    SamplingOptions,
    finish_sharded_step,
    make_trace,
    shard_seed,
    trace_shards,
    usage_stats,
)
from ..modelref import ResolvedModel, resolve_model, trained_in_run
from ..records import (
    GradedTrace,
    Label,
    Message,
    Problem,
    Trace,
    atomic_write_json,
    read_records,
    write_records,
)
from ..rundir import RunDir, fingerprint
from ..stages import Stage
from ..tasks import TASKS
from ..tasks.stage import problems_by_id, run_tasks
from ..testbed.models import TESTBED_PREFIX
from ..ui import note
from ..verify.grading import grade_trace
from ..verify.reasoning import format_completion, split_reasoning
from ..verify.stage import GraderChoice
from .sets import graded_fingerprint, graded_requirement

# --- the prompt ------------------------------------------------------------------------------------

# A paraphrase of the released DAP system prompt (SmallDoges/small-thoughts): same three tiers, same
# two sections; its closing sentence is quoted.
DAP_SYSTEM_PROMPT = """\
You explain how to solve a problem: you reason systematically first, then state the final solution.

Start by judging how complex the problem is, and pick the thinking framework that fits it, so that
the length of your reasoning matches the difficulty of the problem:

Simple problem:
**Analysis:** what is given and what is asked.
**Approach:** the direct way to the answer.
**Summary:** the result in one or two sentences.

Moderately complex problem:
**Analysis:** what is given, what is asked, what makes it tricky.
**Initial Approach:** a first way to solve it.
**Reflection:** what is right and what is weak or wrong in it.
**Improvement:** the corrected, better approach.
**Summary:** the result and why it holds.

Highly complex problem:
**Analysis:** what is given, what is asked, what makes it hard.
**Problem Decomposition:** the sub-problems it breaks into.
**Sub-problem Processing:** for each sub-problem an initial approach, a reflection on it and an improved solution.
**Integration:** how the sub-solutions combine into a full solution.
**Overall Reflection:** a check of the integrated solution.
**Final Optimization:** what can still be simplified or made more precise.
**Summary:** the result and the key steps to it.

Write your reply in exactly two sections:

**Thought:**
your reasoning, under the headings of the framework you chose

**Solution:**
the final solution: logical, accurate and concise, with the steps needed to reach the conclusion,
ending with the final answer

You must first assess the problem complexity, choose an appropriate thinking framework, and strictly \
follow the selected format."""

# The released user message, with an optional line on how to state the answer (the release prefixes
# math questions with "Return your final response within \boxed{}.").
DAP_USER_TEMPLATE = (
    "{answer_format}{question}\nBelow is the correct answer to the above question:\n{answer}\n"
    "{trace_block}You need to provide the correct reasoning and solution based on the question and answer."
)
TRACE_BLOCK = (
    "Below is a long reasoning that reaches this answer; rewrite it in the framework that fits the "
    "problem, keeping only the steps that are needed:\n{trace}\n"
)
TEMPLATE_FIELDS = ("question", "answer", "answer_format", "trace", "trace_block")


def answer_format(task: str) -> str:
    """How to state the final answer, as an instruction line: testbed tasks are graded on "The answer
    is X."; benchmark prompts already end with their own instruction (\\boxed{}, a label, a letter)."""
    return (
        'Return your final response as "The answer is X." at the end of the Solution.\n'
        if task in TASKS
        else ""
    )


def question_text(problem: Problem) -> str:
    return "\n\n".join(m.content for m in problem.messages if m.role == "user")


def original_reasoning(trace: Trace) -> str:
    return trace.reasoning if trace.reasoning is not None else trace.completion


def dap_messages(
    problem: Problem,
    trace: Trace,
    *,
    include_trace: bool = False,
    system_prompt: str | None = None,
    template: str | None = None,
) -> list[Message]:
    """The chat prompt asking for a DAP rewrite of `trace` (an empty system prompt sends none)."""
    fields = {
        "question": question_text(problem),
        "answer": problem.answer,
        "answer_format": answer_format(problem.task),
        "trace": original_reasoning(trace),
    }
    fields["trace_block"] = TRACE_BLOCK.format(trace=fields["trace"]) if include_trace else ""
    system = DAP_SYSTEM_PROMPT if system_prompt is None else system_prompt
    user = (template or DAP_USER_TEMPLATE).format(**fields)
    return ([Message(role="system", content=system)] if system else []) + [Message(role="user", content=user)]


# --- reading the reply -----------------------------------------------------------------------------

Tier = Literal["simple", "moderate", "complex"]
TIERS: tuple[Tier, ...] = ("simple", "moderate", "complex")

# A section heading on its own line start: "**Solution:**", "Solution:", "## Solution", "**Solution**".
_SECTION = r"^[ \t]*(?:#{{1,6}}[ \t]*)?(?:\*\*|__)?[ \t]*(?:{words})[ \t]*(?:\*\*|__)?[ \t]*(?::[ \t]*(?:\*\*|__)?|$)"
_SOLUTION = re.compile(_SECTION.format(words="solution"), re.IGNORECASE | re.MULTILINE)
_THOUGHT = re.compile(_SECTION.format(words="thoughts?"), re.IGNORECASE | re.MULTILINE)
_TAGS = ("<|begin_of_thought|>", "<|end_of_thought|>", "<|begin_of_solution|>", "<|end_of_solution|>")
# Framework headings, as a line start (optionally a bullet, a number or #'s, bold), then ':' or the end of the line.
_HEADING = re.compile(
    r"^[ \t]*(?:[-*+][ \t]+|\d+[.)][ \t]+|#{1,6}[ \t]*)?(?:\*\*|__)?[ \t]*"
    r"(Problem Decomposition|Sub-?problem(?:s)?(?: Processing| \d+)?|Integration|Overall Reflection|"
    r"Final Optimization|Initial Approach|Reflection|Improvement|Analysis|Approach|Summary)"
    r"[ \t]*(?:\*\*|__)?[ \t]*(?::|$)",
    re.IGNORECASE | re.MULTILINE,
)
_TIER_HEADINGS = {
    "complex": {"problem decomposition", "sub-problem processing", "integration", "overall reflection",
                "final optimization"},
    "moderate": {"initial approach", "reflection", "improvement"},
    "simple": {"analysis", "approach", "summary"},
}  # fmt: skip


def framework_headings(thought: str) -> list[str]:
    """The DAP framework headings in a Thought section, in order, normalised ("Sub-problem 2" →
    "sub-problem processing")."""
    found = []
    for match in _HEADING.finditer(thought):
        name = " ".join(match.group(1).lower().split())
        if name.startswith(("sub-problem", "subproblem")):
            name = "sub-problem processing"
        found.append(name)
    return found


def judged_tier(headings: Sequence[str]) -> Tier | None:
    """The framework the teacher chose: the most complex tier whose own headings appear (Analysis and
    Summary open and close every tier; Approach alone is the simple one)."""
    names = set(headings)
    for tier in ("complex", "moderate", "simple"):
        if names & _TIER_HEADINGS[tier]:
            return tier
    return None


@dataclass(frozen=True)
class DapReply:
    """A teacher's reply read as DAP sections; `solution` is None when it has no Solution section."""

    thought: str | None
    solution: str | None
    headings: tuple[str, ...]
    tier: Tier | None
    teacher_thinking_dropped: bool

    @property
    def structured(self) -> bool:
        return self.solution is not None

    def completion(self) -> str:
        """The trace text in the `<think>` convention: Thought as reasoning, Solution as final text."""
        assert self.solution is not None
        return format_completion((self.thought or "").strip(), self.solution.strip())


def parse_dap(text: str) -> DapReply:
    """Read a teacher's reply (its own `<think>` block, if it wrote one, is left out) as Thought and
    Solution sections: `**Thought:** … **Solution:** …` (any heading style) or Bespoke-style tags
    `<|begin_of_thought|> … <|begin_of_solution|> …`. The Solution is what follows the last Solution
    heading; the Thought what precedes it, without its own heading."""
    split = split_reasoning(text)
    own_thinking = split.reasoning is not None and split.closed
    visible = split.final if own_thinking else text
    if _TAGS[2] in visible:
        before, solution = visible.rsplit(_TAGS[2], 1)
    else:
        matches = list(_SOLUTION.finditer(visible))
        if not matches:  # not in the format; the headings it has still say which framework it began
            headings = framework_headings(visible)
            return DapReply(None, None, tuple(headings), judged_tier(headings), False)
        before, solution = visible[: matches[-1].start()], visible[matches[-1].end() :]
    solution = solution.split(_TAGS[3], 1)[0]
    thought_heading = _THOUGHT.search(before)
    thought = before[thought_heading.end() :] if thought_heading else before
    for tag in _TAGS[:2]:
        thought = thought.replace(tag, "")
    dropped = own_thinking
    if not thought.strip() and own_thinking:  # Thought inside the teacher's <think>, Solution after it
        thought, dropped = split.reasoning or "", False
        heading = _THOUGHT.search(thought)
        thought = thought[heading.end() :] if heading else thought
    headings = framework_headings(thought)
    return DapReply(thought.strip(), solution.strip(), tuple(headings), judged_tier(headings), dropped)


# --- options and the sharded teacher job shared with `chunk` -----------------------------------------


class TeacherOptions(SamplingOptions, BackendOptions):
    """A teacher called once per row (a rewrite, a labelling): backend and sampling options."""

    n: int = Field(1, ge=1, le=1, description="one reply per row")
    temperature: float = Field(0.0, ge=0, description="sampling temperature (0: greedy, as DAP)")
    shard_size: int = Field(256, ge=1, description="rows per shard, the unit of resumption")


@dataclass(frozen=True)
class PromptRow:
    """One teacher call: the problem and sample index it belongs to, and the chat prompt."""

    problem: Problem
    sample_idx: int
    messages: list[Message]

    @property
    def key(self) -> tuple[str, int]:
        return (self.problem.id, self.sample_idx)


def teacher_source(cfg: TeacherOptions, model: ResolvedModel, **extra) -> dict:
    sampling = cfg.sampling(1, cfg.temperature, cfg.seed)
    return {
        "model": model.name,
        "path": model.path,
        "backend": cfg.backend,
        "sampling": asdict(sampling),
        "sampling_hash": sampling.fingerprint(),
        **extra,
    }


def run_teacher_job(
    cfg: TeacherOptions,
    model: ResolvedModel,
    rows: Sequence[PromptRow],
    directory: Path,
    *,
    step_key: str,
    step_fingerprint: str,
    source: str,
    overwrite: bool,
) -> tuple[dict[tuple[str, int], Trace], ShardIndex]:
    """Ask the teacher once per row in resumable shards (`generate`'s ShardedJob: the raw replies are
    Trace rows in directory/shard-*.parquet, finished shards in its index.json). Returns the replies
    by (problem_id, sample_idx) and the index (usage, failures). Failed requests stop the step as in
    `generate`, unless `allow_failures` (then their rows are missing from the replies)."""
    if len({row.key for row in rows}) != len(rows):
        raise UserError(f"{step_key}: two rows share a (problem_id, sample_idx); each row needs its own")

    def process(generator: Generator, shard: int, batch: Sequence[PromptRow], progress) -> list:
        sampling = cfg.sampling(1, cfg.temperature, shard_seed(cfg.seed, shard))
        seeds = [row_seed(cfg.seed, r.problem.id, r.sample_idx) for r in batch]  # a rerun redraws the same
        replies = generator.generate([r.messages for r in batch], sampling, progress, seeds=seeds)
        return [reply[0] for reply in replies]

    def shard_path(shard: int) -> Path:
        return directory / f"shard-{shard:05d}.parquet"

    def save(shard: int, pairs: list[tuple[PromptRow, Completion]], keep_saved: bool) -> None:
        traces = [make_trace(row.problem, row.sample_idx, reply, source) for row, reply in pairs]
        if keep_saved and shard_path(shard).exists():
            traces = read_records(shard_path(shard), Trace) + traces
        write_records(shard_path(shard), traces, Trace)

    def saved_keys(shard: int) -> set[tuple[str, int]]:
        path = shard_path(shard)
        return {(t.problem_id, t.sample_idx) for t in read_records(path, Trace)} if path.exists() else set()

    job = ShardedJob(
        directory=directory,
        fingerprint=step_fingerprint,
        shards=[rows[i : i + cfg.shard_size] for i in range(0, len(rows), cfg.shard_size)],
        key=lambda row: row.key,
        process=process,
        save=save,
        saved_keys=saved_keys,
        open_generator=lambda: open_generator(cfg, model, cfg.batch_size, 0),
    )
    index = job.run(step_key.replace(":", " "), overwrite)
    finish_sharded_step(step_key, index, cfg.allow_failures)
    replies = {}
    if index.path.exists():
        for shard in trace_shards(directory):
            replies.update({(t.problem_id, t.sample_idx): t for t in read_records(shard, Trace)})
    return replies, index


class LengthCounter:
    """Lengths of texts in a tokenizer's tokens, or in whitespace-separated words without one."""

    def __init__(self, tokenizer: str | None):
        self.source = tokenizer
        if tokenizer is None:
            self._tokenizer, self.unit = None, "words"
        else:
            from ..models import load_tokenizer

            self._tokenizer = load_tokenizer(tokenizer, chat_template=False)
            self.unit = "tokens"

    def __call__(self, text: str) -> int:
        if self._tokenizer is None:
            return len(text.split())
        return len(self._tokenizer(text, add_special_tokens=False)["input_ids"])


def tokenizer_path(reference: str | None, run: RunDir) -> str | None:
    """A tokenizer reference as from_pretrained takes it: testbed and run models resolved, folders
    and Hub ids as given."""
    if reference is None:
        return None
    if reference.startswith(TESTBED_PREFIX) or (
        trained_in_run(reference) and run.checkpoint(reference).is_dir()
    ):
        return resolve_model(reference, run).path
    return reference


# --- the stage -------------------------------------------------------------------------------------

DropReason = Literal["failed", "cut", "unstructured", "unparseable", "incorrect"]
DROP_REASONS: tuple[DropReason, ...] = ("failed", "cut", "unstructured", "unparseable", "incorrect")


class RewriteConfig(TeacherOptions, GraderChoice):
    model: str = Field(
        description="the rewriting teacher: testbed:teacher, a model trained in this run, a model folder, "
        "a Hub id, or (backend openai) the name the server knows it by"
    )
    traces: str = Field(description="graded traces to rewrite (graded/<name>)")
    name: str | None = Field(
        None, description="output name: graded/<name> (default: <traces>-dap); raw replies in traces/<name>"
    )
    select: list[Label] = Field(
        ["correct"], min_length=1, description="labels of the traces to rewrite (default: the correct ones)"
    )
    include_trace: bool = Field(
        False,
        description="also show the teacher the original reasoning to compress (the paper's generate-then-rewrite); "
        "default: the released one-call prompt with problem and answer only",
    )
    system_prompt: str | None = Field(
        None, description="system prompt instead of the DAP one (empty: no system message)"
    )
    template: str | None = Field(
        None,
        description="user message template instead of DAP's, with any of {question} {answer} {answer_format} "
        "{trace} {trace_block}",
    )
    tokenizer: str | None = Field(
        None,
        description="the teacher's tokenizer: for openai's completions endpoint, and to count the tokens of "
        "traces before and after (default: the model's own; words with backend openai)",
    )
    require_structure: bool = Field(
        True,
        description="drop replies without a Solution section (off: grade such a reply as written, without tier)",
    )

    @field_validator("template")
    @classmethod
    def _known_fields(cls, template: str | None) -> str | None:
        if template is not None:
            try:
                names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
            except ValueError as err:
                raise ValueError(f"not a valid template ({err}); write literal braces as {{{{ }}}}") from None
            unknown = sorted(names - set(TEMPLATE_FIELDS))
            if unknown:
                raise ValueError(f"unknown field {{{unknown[0]}}}; fields: {', '.join(TEMPLATE_FIELDS)}")
        return template

    @model_validator(mode="after")
    def _not_its_own_input(self) -> RewriteConfig:
        if self.output_name == self.traces:
            raise ValueError(f"name: the rewrites need their own name, not the input's ({self.traces!r})")
        return self

    @property
    def output_name(self) -> str:
        return self.name or f"{self.traces}-dap"


def dropped_file(run: RunDir, name: str) -> Path:
    """The rewrites left out of graded/<name>, with their reasons (beside it)."""
    return run.graded(name).with_name(f"{name}.dropped.json")


@dataclass
class Rewritten:
    original: GradedTrace
    graded: GradedTrace | None  # None when the request failed
    reply: DapReply | None
    reason: DropReason | None  # None: kept


def judge_rewrite(
    original: GradedTrace, reply: Trace | None, problem: Problem, cfg: RewriteConfig, source: dict
) -> Rewritten:
    """Read one teacher reply as a DAP rewrite, grade it, and decide whether it is kept."""
    if reply is None:
        return Rewritten(original, None, None, "failed")
    dap = parse_dap(reply.completion)
    cut = reply.finish_reason == "length" or not split_reasoning(reply.completion).closed
    text = dap.completion() if dap.structured and not cut else reply.completion
    split = split_reasoning(text)
    row_source = {
        "rewriter": source,
        "original": {"traces": cfg.traces, "source": _json_or_text(original.source),
                     "completion_tokens": original.completion_tokens, "label": original.label},
        "dap": {"tier": dap.tier, "headings": list(dap.headings), "structured": dap.structured,
                "teacher_thinking_dropped": dap.teacher_thinking_dropped},
    }  # fmt: skip
    trace = Trace(
        problem_id=original.problem_id,
        task=original.task,
        sample_idx=original.sample_idx,
        source=json.dumps(row_source),
        completion=text,
        reasoning=split.reasoning,
        final=split.final,
        prompt_tokens=reply.prompt_tokens,
        completion_tokens=reply.completion_tokens,
        finish_reason=reply.finish_reason,
    )
    graded = grade_trace(trace, problem, cfg.grader_for(problem.task))
    if cut:
        reason = "cut"
    elif not dap.structured and cfg.require_structure:
        reason = "unstructured"
    elif graded.label != "correct":
        reason = graded.label
    else:
        reason = None
    return Rewritten(original, graded, dap, reason)


def _json_or_text(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _mean(values: Sequence[float]) -> float | None:
    return round(sum(values) / len(values), 2) if values else None


def rewrite_stats(results: list[Rewritten], count: LengthCounter) -> dict:
    """Counts by outcome, the judged tiers, and lengths before and after (the kept rewrites)."""
    kept = [r for r in results if r.reason is None]
    tiers = Counter((r.reply.tier or "none") if r.reply else "none" for r in results if r.graded is not None)
    by_tier: dict[str, dict[str, list[int]]] = defaultdict(lambda: {"before": [], "after": []})
    for r in kept:
        before, after = count(r.original.completion), count(r.graded.completion)
        for group in ("all", (r.reply.tier if r.reply else None) or "none"):
            by_tier[group]["before"].append(before)
            by_tier[group]["after"].append(after)

    def summary(lengths: dict[str, list[int]]) -> dict:
        before, after = _mean(lengths["before"]), _mean(lengths["after"])
        return {
            "rewrites": len(lengths["before"]),
            "before_mean": before,
            "after_mean": after,
            "ratio": round(after / before, 3) if before else None,
        }

    return {
        "selected": len(results),
        "kept": len(kept),
        "kept_by_task": dict(Counter(r.original.task for r in kept)),
        "dropped": {reason: sum(r.reason == reason for r in results) for reason in DROP_REASONS},
        "tiers": {tier: tiers[tier] for tier in (*TIERS, "none") if tiers[tier]},
        "length": {
            "unit": count.unit,
            "counted_with": count.source,
            **summary(by_tier["all"]),
            "by_tier": {t: summary(by_tier[t]) for t in (*TIERS, "none") if t in by_tier},
        },
    }


def run_rewrite(cfg: RewriteConfig, run: RunDir, overwrite: bool) -> None:
    name = cfg.output_name
    key = f"rewrite:{name}"
    for other in (f"verify:{name}", f"generate:{name}"):
        if other in run.manifest()["steps"]:
            raise UserError(
                f"{key}: {other} already writes {name!r} in {run.root}; give the rewrites another name"
            )
    model = backend_model(cfg, cfg.model, run)
    prompt = {"system": cfg.system_prompt, "template": cfg.template, "include_trace": cfg.include_trace}
    inputs = {
        "graded": graded_fingerprint(run, cfg.traces),
        "problems": run.finished_step("problems")["fingerprint"],
        "model": model.fingerprint,
        # the built-in prompt's text, so that rewording it recomputes the step
        "prompt": fingerprint([DAP_SYSTEM_PROMPT, DAP_USER_TEMPLATE, TRACE_BLOCK]),
        "graders": {task: cfg.grader_for(task).id for task in run_tasks(run)},
    }
    out = run.traces(name)
    source = teacher_source(cfg, model, prompt={k: v for k, v in prompt.items() if v not in (None, False)})

    def body(step_fingerprint: str) -> dict:
        problems = problems_by_id(run)
        graded = read_records(run.graded(cfg.traces), GradedTrace)
        selected = [g for g in graded if g.label in cfg.select]
        if not selected:
            raise UserError(
                f"{key}: graded/{cfg.traces} has no traces labelled {' or '.join(cfg.select)} to rewrite"
            )
        missing = next((g for g in selected if g.problem_id not in problems), None)
        if missing:
            raise UserError(
                f"{key}: problem_id {missing.problem_id!r} of graded/{cfg.traces} is not in this run"
            )
        rows = [
            PromptRow(
                problems[g.problem_id],
                g.sample_idx,
                dap_messages(problems[g.problem_id], g, include_trace=cfg.include_trace,
                             system_prompt=cfg.system_prompt, template=cfg.template),
            )
            for g in selected
        ]  # fmt: skip
        replies, index = run_teacher_job(
            cfg, model, rows, out, step_key=key, step_fingerprint=step_fingerprint,
            source=json.dumps(source), overwrite=overwrite,
        )  # fmt: skip
        results = [
            judge_rewrite(g, replies.get((g.problem_id, g.sample_idx)), problems[g.problem_id], cfg, source)
            for g in selected
        ]
        write_records(run.graded(name), [r.graded for r in results if r.reason is None], GradedTrace)
        dropped = [
            {
                "problem_id": r.original.problem_id,
                "sample_idx": r.original.sample_idx,
                "task": r.original.task,
                "reason": r.reason,
                "label": r.graded.label if r.graded else None,
                "extracted": r.graded.extracted if r.graded else None,
                "gold": problems[r.original.problem_id].answer,
                "tier": r.reply.tier if r.reply else None,
            }
            for r in results
            if r.reason is not None
        ]
        count = LengthCounter(
            tokenizer_path(cfg.tokenizer, run) or (model.path if cfg.backend != "openai" else None)
        )
        stats = {"rewriter": model.path, "input": len(graded), **rewrite_stats(results, count)}
        atomic_write_json(dropped_file(run, name), {"dropped": stats["dropped"], "rows": dropped})
        return {**stats, "usage": usage_stats(index, cfg.pricing, cfg.backend)}

    outputs = [run.graded(name), dropped_file(run, name), out / "index.json"]
    result = run.step(key, cfg, inputs, body, outputs=outputs, overwrite=overwrite)
    run.update_manifest(teacher_usage=usage_totals(run.manifest()))
    stats = result["stats"]
    length = stats["length"]
    shorter = (
        f"; {length['unit']} per trace {length['before_mean']} → {length['after_mean']}"
        if length["rewrites"]
        else ""
    )
    note(
        f"{key}: kept {stats['kept']} of {stats['selected']} rewrites, dropped "
        f"{ {k: v for k, v in stats['dropped'].items() if v} }, tiers {stats['tiers']}{shorter}"
    )


STAGE = Stage(
    "rewrite",
    RewriteConfig,
    run_rewrite,
    "rewrite graded traces with a teacher's difficulty-aware prompt (DAP) and grade the rewrites again",
    produces=lambda cfg: [f"rewrite:{cfg.output_name}"],
    requires=lambda cfg: {"traces": graded_requirement(cfg.traces), **backend_requirements(cfg, cfg.model)},
)
