"""Memorization: does a model reproduce its training traces verbatim?

Discoverable memorization, as in "Memorization Dynamics in Knowledge Distillation for LMs" (arXiv
2601.15394; method card 20, whose protocol details are inferred). For each training example the
model reads the prompt and the first `prefix_tokens` (P) completion tokens and decodes
`suffix_tokens` (S) tokens greedily; the example is **memorised** when they equal the true next S
tokens exactly. The completion is tokenized as the student is trained on it (`chat.completion_ids`,
end-of-turn token included). Reported overall and per task: the exact extraction rate and the
per-token match rate (the share of the S positions where the greedy token equals the true one,
position by position), so that a choice of P and S can be judged by both.

Extraction measures skill as well as rote: where a trace follows from its prompt (the testbed's
arithmetic, whose every step is determined), a model that solves the problem reproduces the trace
without ever having seen it. `heldout` names examples the model was not trained on (traces of
held-out problems, curated the same way), tested alike: their extraction rate is what skill alone
gives, and `excess_exact_rate` = rate on the training data − rate on the held-out data.

Examples with fewer than P + S completion tokens cannot be tested; they are counted
(`too_short`) and left out of the rates, never dropped silently. Each example also gets its zlib
entropy (bytes of the zlib-compressed completion text), the cheapest of the paper's predictors of
which examples a student memorises; the output lists every example with it.
"""

from __future__ import annotations

import zlib
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from ..records import TrainingExample
from ..ui import progress_bar


def zlib_entropy(text: str) -> int:
    """Bytes of the zlib-compressed UTF-8 text (level 9)."""
    return len(zlib.compress(text.encode("utf-8"), 9))


def extraction(
    model_path: str,
    examples: Sequence[TrainingExample],
    prefix_tokens: int,
    suffix_tokens: int,
    batch_size: int = 64,
) -> list[dict]:
    """One record per example: task, ids, completion tokens, `tested` (False when too short),
    `memorised`, `token_match` (share of the S positions decoded right), `zlib_entropy`."""
    from ..generate.hf import HFGenerator  # here: it brings torch along

    generator = HFGenerator(model_path, batch_size=batch_size)
    try:
        return extract(generator, examples, prefix_tokens, suffix_tokens)
    finally:
        generator.close()


def extract(
    generator, examples: Sequence[TrainingExample], prefix_tokens: int, suffix_tokens: int
) -> list[dict]:
    """`extraction` with an open generator (an `HFGenerator`), which the caller closes: one model
    tests several sets of examples."""
    # Imported here: they bring torch and transformers along, which the rest of this module does
    # not need.
    from ..chat import completion_ids, prompt_ids
    from ..generate.base import SamplingParams

    tokenizer = generator.tokenizer
    prompts = prompt_ids(tokenizer, [e.messages for e in examples])
    completions = completion_ids(tokenizer, [e.completion for e in examples])
    records = [
        {
            "problem_id": e.problem_id,
            "sample_idx": e.sample_idx,
            "task": e.task,
            "completion_tokens": len(c),
            "tested": len(c) >= prefix_tokens + suffix_tokens,
            "memorised": None,
            "token_match": None,
            "zlib_entropy": zlib_entropy(e.completion),
        }
        for e, c in zip(examples, completions, strict=True)
    ]
    tested = [i for i, r in enumerate(records) if r["tested"]]
    if tested:
        sampling = SamplingParams(temperature=0.0, max_new_tokens=suffix_tokens)
        with progress_bar("memorization", total=len(tested), unit="examples") as bar:
            decoded = generator.generate_ids(
                [prompts[i] + completions[i][:prefix_tokens] for i in tested], sampling, bar.advance
            )
        for i, samples in zip(tested, decoded, strict=True):
            truth = completions[i][prefix_tokens : prefix_tokens + suffix_tokens]
            greedy = samples[0].token_ids[:suffix_tokens]
            # an early end of turn leaves the remaining positions unmatched
            matches = sum(a == b for a, b in zip(greedy, truth, strict=False))
            records[i]["memorised"] = greedy == truth
            records[i]["token_match"] = matches / suffix_tokens
    return records


def summarise(records: Sequence[dict]) -> dict:
    """Rates over the tested examples, with the untested ones counted."""
    tested = [r for r in records if r["tested"]]
    memorised = [r for r in tested if r["memorised"]]
    others = [r for r in tested if not r["memorised"]]
    return {
        "examples": len(records),
        "tested": len(tested),
        "too_short": len(records) - len(tested),
        "memorised": len(memorised),
        "exact_rate": len(memorised) / len(tested) if tested else None,
        "token_match_rate": float(np.mean([r["token_match"] for r in tested])) if tested else None,
        "mean_zlib_entropy": {
            "memorised": float(np.mean([r["zlib_entropy"] for r in memorised])) if memorised else None,
            "not_memorised": float(np.mean([r["zlib_entropy"] for r in others])) if others else None,
        },
    }


def summarise_by_task(records: list[dict]) -> dict:
    """`summarise` of all records, and of each task's (`by_task`)."""
    per_task: dict[str, list[dict]] = defaultdict(list)
    for record in records:
        per_task[record["task"]].append(record)
    return {
        **summarise(records),
        "by_task": {task: summarise(rows) for task, rows in sorted(per_task.items())},
    }
