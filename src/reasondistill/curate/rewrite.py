"""Rewriting a trace with a difficulty-aware prompt (DAP): the prompt, reading the teacher's reply, and
judging the rewrite (the `rewrite` stage runs them over a graded set).

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

Every rewrite is graded with its task's grader and kept only when graded correct; the others are
dropped for a reason (`judge_rewrite`): `cut` (token limit reached, or the teacher's own thinking
never closed), `unstructured` (no Solution section), `unparseable` (no answer in the expected form),
`incorrect` (the rewrite changed the answer), `failed` (the request failed after its retries).
`rewrite_stats` counts them, the judged tiers, and the lengths of the texts before and after.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from ..chat import user_text
from ..records import GradedTrace, Message, Problem, Trace
from ..tasks import TASKS
from ..verify.graders import Grader
from ..verify.grading import grade_trace
from ..verify.reasoning import format_completion, split_reasoning
from .teacher_jobs import LengthCounter

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
        "question": user_text(problem.messages),
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


# --- judging a rewrite -----------------------------------------------------------------------------

DropReason = Literal["failed", "cut", "unstructured", "unparseable", "incorrect"]
DROP_REASONS: tuple[DropReason, ...] = ("failed", "cut", "unstructured", "unparseable", "incorrect")


@dataclass
class Rewritten:
    """An original trace, its graded rewrite, and why the rewrite is dropped (`reason` None: kept)."""

    original: GradedTrace
    graded: GradedTrace | None  # None when the request failed
    reply: DapReply | None
    reason: DropReason | None  # None: kept


def judge_rewrite(
    original: GradedTrace,
    reply: Trace | None,
    problem: Problem,
    grader: Grader,
    *,
    traces: str,
    source: dict,
    require_structure: bool,
) -> Rewritten:
    """Read one teacher reply as a DAP rewrite, grade it, and decide whether it is kept. `traces`
    names the graded set of the original and `source` the rewriter (both go into the rewrite's
    `source`); `require_structure`: a reply without a Solution section is dropped."""
    if reply is None:
        return Rewritten(original, None, None, "failed")
    dap = parse_dap(reply.completion)
    cut = reply.finish_reason == "length" or not split_reasoning(reply.completion).closed
    text = dap.completion() if dap.structured and not cut else reply.completion
    split = split_reasoning(text)
    row_source = {
        "rewriter": source,
        "original": {"traces": traces, "source": _json_or_text(original.source),
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
    graded = grade_trace(trace, problem, grader)
    if cut:
        reason = "cut"
    elif not dap.structured and require_structure:
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
