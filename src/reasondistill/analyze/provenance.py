"""Sentence provenance: where did each sentence of a distilled model's reasoning come from?

After "Where Did This Sentence Come From?" (arXiv 2512.20908; method card 19). Every sentence
(or line) a distilled student D wrote is scored under the teacher T, the original student S0 (D's
starting weights) and D itself, in the same context: the prompt and the completion up to that
sentence. A sentence's score ℓ_M is its length-normalised log-probability under model M, the mean
log-probability of its tokens (nats per token; exp(ℓ) is the geometric-mean token probability).

Categories, decided in this order (the paper names the four categories; its thresholds were not
recovered, so `likely`, `origin_margin` and `boost_margin` are options and these defaults inferred):

1. **student-originated** if the teacher would not write it: exp(ℓ_T) < `likely` (0.3);
2. **teacher-originated** if the teacher makes it clearly more likely than the original student:
   ℓ_T − ℓ_S0 ≥ `origin_margin` (0.5 nats per token, a factor 1.65 per token);
3. **student-originated** if the original student makes it clearly more likely than the teacher:
   ℓ_S0 − ℓ_T ≥ `origin_margin`;
4. otherwise the sentence was **pre-existing** in both models, and distillation **boosted** it if
   ℓ_D − ℓ_S0 ≥ `boost_margin` (0.5), else it is **pre-existing, not boosted**.

One forward pass per completion and model gives every token's log-probability given everything
before it, so a sentence's context is exactly prompt + earlier text; tokens are assigned to the
sentence holding their last non-space character (white-space-only tokens, such as the line breaks
between steps, are context only). The three models must share one tokenizer (vocabulary, EOS, chat
template): then all three score the same token ids and per-token normalisation compares like with
like. Models with different tokenizers are refused before any weights load.

`summarise` gives counts and shares per category (overall and by task), the mean scores of each
category under each model, example sentences, and the accuracy of completions grouped by their
share of teacher-originated sentences (for graded and evaluation sets, which carry labels); the
`provenance` stage writes them to analysis/<name>.json.
"""

from __future__ import annotations

import bisect
import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

import numpy as np

from ..records import Message
from ..ui import progress_bar
from ..verify.reasoning import THINK_CLOSE, THINK_OPEN
from .selection import Text
from .text import Segment, Unit, segments

TEACHER, STUDENT, BOOSTED, NOT_BOOSTED = (
    "teacher-originated",
    "student-originated",
    "pre-existing, boosted",
    "pre-existing, not boosted",
)
CATEGORIES = (TEACHER, STUDENT, BOOSTED, NOT_BOOSTED)
ROLES = ("teacher", "student", "distilled")


def classify(
    teacher: float,
    student: float,
    distilled: float,
    likely: float = 0.3,
    origin_margin: float = 0.5,
    boost_margin: float = 0.5,
) -> str:
    """The provenance category of a sentence from its scores ℓ_T, ℓ_S0, ℓ_D (mean token log-probs)."""
    if teacher < math.log(likely):
        return STUDENT
    if teacher - student >= origin_margin:
        return TEACHER
    if student - teacher >= origin_margin:
        return STUDENT
    if distilled - student >= boost_margin:
        return BOOSTED
    return NOT_BOOSTED


# ---- segmentation and token alignment -------------------------------------------------------------
@dataclass
class Located:
    """A completion's token ids (with EOS) and, for each traced step, the indices of its tokens."""

    token_ids: list[int]
    steps: list[Segment]
    step_tokens: list[list[int]]


def traced_span(completion: str, scope: str) -> tuple[int, int] | None:
    """The character span whose steps are traced: the reasoning block, or the whole completion."""
    if scope == "completion":
        return 0, len(completion)
    close = completion.find(THINK_CLOSE)
    opening = completion.find(THINK_OPEN)
    start = opening + len(THINK_OPEN) if opening >= 0 and (close < 0 or opening < close) else 0
    if close >= 0:
        return start, close
    return (start, len(completion)) if opening >= 0 else None


def locate(tokenizer, completion: str, unit: Unit, scope: str = "reasoning") -> Located:
    """Tokenize a completion as it is trained and scored (`chat.completion_ids`: no special tokens,
    EOS appended) and assign each token to the step holding its last non-space character."""
    encoded = tokenizer(completion, add_special_tokens=False, return_offsets_mapping=True)
    token_ids = [*encoded["input_ids"], tokenizer.eos_token_id]
    span = traced_span(completion, scope)
    steps = []
    if span is not None:
        start, end = span
        steps = [
            Segment(s.start + start, s.end + start, s.text) for s in segments(completion[start:end], unit)
        ]
    starts = [s.start for s in steps]
    step_tokens: list[list[int]] = [[] for _ in steps]
    for index, (first, last) in enumerate(encoded["offset_mapping"]):
        visible = [j for j in range(first, last) if not completion[j].isspace()]
        if not visible:
            continue
        char = visible[-1]
        step = bisect.bisect_right(starts, char) - 1
        if step >= 0 and char < steps[step].end:
            step_tokens[step].append(index)
    kept = [(s, t) for s, t in zip(steps, step_tokens, strict=True) if t]
    return Located(token_ids, [s for s, _ in kept], [t for _, t in kept])


# ---- scoring --------------------------------------------------------------------------------------
def step_scores(logprobs: np.ndarray, located: Located) -> list[float]:
    """Mean token log-probability of each step."""
    return [float(np.mean(logprobs[indices])) for indices in located.step_tokens]


def score_steps(
    models: dict[str, str],
    prompts: Sequence[Sequence[Message]],
    completions: Sequence[str],
    unit: Unit,
    scope: str = "reasoning",
    batch_size: int = 16,
    loading: dict | None = None,
) -> tuple[list[Located], dict[str, list[list[float]]]]:
    """Each completion's steps, and each model's score of every step ({role: [[ℓ per step]]}).

    `models` maps a role to a model folder or Hub id; they must share one tokenizer. Models are
    loaded one at a time, with `loading` (`ModelLoading.loading()`: dtype, attention kernel)."""
    # Imported here: they bring torch and transformers along, which the rest of this module does
    # not need.
    from ..chat import prompt_ids
    from ..generate.hf import HFGenerator
    from ..models import load_tokenizer
    from .common import check_same_tokenizer, completion_logprobs, fast_tokenizer

    tokenizers = [(role, load_tokenizer(path, chat_template=False)) for role, path in models.items()]
    check_same_tokenizer(
        [(f"{role} {models[role]}", tok) for role, tok in tokenizers], "provenance (token-level scores)"
    )
    tokenizer = fast_tokenizer(tokenizers[0][1], str(next(iter(models.values()))))
    located = [locate(tokenizer, c, unit, scope) for c in completions]
    prompt_tokens = prompt_ids(tokenizer, prompts)
    scores: dict[str, list[list[float]]] = {}
    for role, path in models.items():
        same = next((other for other, scored in models.items() if scored == path and other in scores), None)
        if same is not None:  # one model in two roles (a sanity check) is scored once
            scores[role] = scores[same]
            continue
        generator = HFGenerator(path, batch_size=batch_size, **(loading or {}))
        with progress_bar(f"provenance: {role}", total=len(completions), unit="completions") as bar:
            logprobs = completion_logprobs(
                generator.model, generator.tokenizer, prompt_tokens, [x.token_ids for x in located],
                batch_size, bar.advance,
            )  # fmt: skip
        generator.close()
        scores[role] = [step_scores(lp, x) for lp, x in zip(logprobs, located, strict=True)]
    return located, scores


# ---- the analysis ---------------------------------------------------------------------------------
def summarise(
    texts: Sequence[Text], located: Sequence[Located], scores: dict[str, list[list[float]]], cfg
) -> dict:
    """Category counts and shares, mean scores per category, examples, accuracy by teacher share.

    `cfg` gives the thresholds (`likely`, `origin_margin`, `boost_margin`), the `examples` kept per
    category and the `share_bins` (the `provenance` stage's options)."""
    counts: Counter = Counter()
    by_task: dict[str, Counter] = defaultdict(Counter)
    sums = {c: np.zeros(3) for c in CATEGORIES}
    examples: dict[str, list[dict]] = {c: [] for c in CATEGORIES}
    shares: list[tuple[float, str | None]] = []
    without_steps = 0
    for i, (text, where) in enumerate(zip(texts, located, strict=True)):
        if not where.steps:
            without_steps += 1
            continue
        teacher_steps = 0
        for j, step in enumerate(where.steps):
            triple = [scores[role][i][j] for role in ROLES]
            category = classify(*triple, cfg.likely, cfg.origin_margin, cfg.boost_margin)
            counts[category] += 1
            by_task[text.task][category] += 1
            sums[category] += triple
            teacher_steps += category == TEACHER
            if len(examples[category]) < cfg.examples:
                examples[category].append(
                    {"problem_id": text.problem_id, "sentence": step.text,
                     **{role: round(value, 4) for role, value in zip(ROLES, triple, strict=True)}}
                )  # fmt: skip
        shares.append((teacher_steps / len(where.steps), text.label))
    total = sum(counts.values())
    categories = {
        c: {
            "count": counts[c],
            "share": counts[c] / total if total else None,
            "mean_logprob": {
                role: float(sums[c][k] / counts[c]) if counts[c] else None for k, role in enumerate(ROLES)
            },
        }
        for c in CATEGORIES
    }
    return {
        "completions": len(texts),
        "completions_without_steps": without_steps,
        "steps": total,
        "steps_per_completion": total / (len(texts) - without_steps) if len(texts) > without_steps else None,
        "categories": categories,
        "by_task": {
            task: {"steps": sum(c.values()), **{k: c[k] for k in CATEGORIES}}
            for task, c in sorted(by_task.items())
        },
        "accuracy_by_teacher_share": _by_share(shares, cfg.share_bins),
        "examples": examples,
    }


def _by_share(shares: list[tuple[float, str | None]], edges: list[float]) -> list[dict]:
    rows = []
    for k, (low, high) in enumerate(pairwise(edges)):
        last = k == len(edges) - 2
        inside = [label for share, label in shares if low <= share < high or (last and share == high)]
        graded = [label for label in inside if label is not None]
        rows.append(
            {
                "low": low,
                "high": high,
                "completions": len(inside),
                "correct": sum(label == "correct" for label in graded),
                "accuracy": sum(label == "correct" for label in graded) / len(graded) if graded else None,
            }
        )
    return rows
