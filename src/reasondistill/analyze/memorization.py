"""`memorization`: does a model reproduce its training traces verbatim?

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
from pathlib import Path

import numpy as np
from pydantic import Field

from ..chat import completion_ids, prompt_ids
from ..curate.sets import training_data, training_data_name, training_data_step
from ..generate.base import SamplingParams
from ..modelref import required_steps, resolve_model
from ..records import TrainingExample, read_records
from ..rundir import RunDir
from ..stages import Stage, StageConfig
from ..ui import note, progress_bar
from .common import Section, analyses, number, only_tasks, percent, write_analysis

KIND = "memorization"


class MemorizationConfig(StageConfig):
    name: str = Field("memorization", description="output name: analysis/<name>.json")
    model: str = Field(
        description="the model to test (testbed:…, a model trained in the run, a folder, a Hub id)"
    )
    data: str = Field(
        description="its training examples: a curated set of the run or a .jsonl/.parquet file of them"
    )
    prefix_tokens: int = Field(
        32,
        ge=0,
        description="P: completion tokens given after the prompt (inferred default; the card has 32–50)",
    )
    suffix_tokens: int = Field(
        32, ge=1, description="S: tokens decoded greedily and compared with the true next S tokens"
    )
    heldout: str | None = Field(
        None,
        description="examples the model was not trained on (a curated set or file), tested alike: the "
        "extraction rate that skill alone gives, to compare with",
    )
    tasks: list[str] | None = Field(None, description="only these tasks (default: all)")
    limit: int | None = Field(None, ge=1, description="at most this many examples per task (in file order)")
    batch_size: int = Field(64, ge=1, description="sequences decoded together")

    operational = frozenset({"batch_size"})


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
    from ..generate.hf import HFGenerator

    generator = HFGenerator(model_path, batch_size=batch_size)
    try:
        return _extract(generator, examples, prefix_tokens, suffix_tokens)
    finally:
        generator.close()


def _extract(
    generator, examples: Sequence[TrainingExample], prefix_tokens: int, suffix_tokens: int
) -> list[dict]:
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


def _select(data: str, path: Path, cfg: MemorizationConfig, run: RunDir) -> list[TrainingExample]:
    where = f"{KIND}:{cfg.name}: {training_data_name(data, run, path)}"
    return only_tasks(read_records(path, TrainingExample), cfg.tasks, cfg.limit, where)


def _with_tasks(records: list[dict]) -> dict:
    per_task: dict[str, list[dict]] = defaultdict(list)
    for record in records:
        per_task[record["task"]].append(record)
    return {
        **summarise(records),
        "by_task": {task: summarise(rows) for task, rows in sorted(per_task.items())},
    }


def run_memorization(cfg: MemorizationConfig, run: RunDir, overwrite: bool) -> None:
    model = resolve_model(cfg.model, run)
    path, data_fingerprint = training_data(cfg.data, run)
    inputs = {"model": model.fingerprint, "data": data_fingerprint}
    heldout_path = None
    if cfg.heldout is not None:
        heldout_path, inputs["heldout"] = training_data(cfg.heldout, run)

    def body(_fingerprint: str) -> dict:
        from ..generate.hf import HFGenerator

        examples = _select(cfg.data, path, cfg, run)
        heldout_examples = _select(cfg.heldout, heldout_path, cfg, run) if heldout_path is not None else None
        generator = HFGenerator(model.path, batch_size=cfg.batch_size)
        records = _extract(generator, examples, cfg.prefix_tokens, cfg.suffix_tokens)
        heldout = None
        if heldout_examples is not None:
            heldout = {
                "data": str(heldout_path),
                **_with_tasks(_extract(generator, heldout_examples, cfg.prefix_tokens, cfg.suffix_tokens)),
            }
        generator.close()
        result = {
            "model": {"name": model.name, "path": model.path},
            "data": str(path),
            "prefix_tokens": cfg.prefix_tokens,
            "suffix_tokens": cfg.suffix_tokens,
            **_with_tasks(records),
            "heldout": heldout,
        }
        trained, skill = result["exact_rate"], heldout["exact_rate"] if heldout else None
        result["excess_exact_rate"] = trained - skill if trained is not None and skill is not None else None
        result["per_example"] = records
        write_analysis(run, cfg.name, KIND, result)
        keys = ("examples", "tested", "too_short", "memorised", "exact_rate", "token_match_rate")
        return {
            **{k: result[k] for k in keys},
            "heldout_exact_rate": skill,
            "excess_exact_rate": result["excess_exact_rate"],
        }

    stats = run.step(
        f"{KIND}:{cfg.name}", cfg, inputs, body, outputs=[run.analysis(cfg.name)], overwrite=overwrite
    )["stats"]
    heldout_note = (
        f"; held-out examples {percent(stats['heldout_exact_rate'])}" if cfg.heldout is not None else ""
    )
    note(
        f"memorization:{cfg.name}: {stats['memorised']} of {stats['tested']} examples extracted "
        f"({percent(stats['exact_rate'])}), per-token match {percent(stats['token_match_rate'])}; "
        f"{stats['too_short']} too short for {cfg.prefix_tokens}+{cfg.suffix_tokens} tokens{heldout_note}"
    )


def report_sections(run: RunDir) -> list[Section]:
    sections: list[Section] = []
    headers = [
        "task", "examples", "tested", "too short", "memorised (exact)", "per-token match",
        "zlib bytes: memorised / not",
    ]  # fmt: skip
    for result in analyses(run, KIND):
        heldout = result.get("heldout")
        rows = []
        for task, s in [*result["by_task"].items(), ("all", result)]:
            zlib_means = s["mean_zlib_entropy"]
            rows.append(
                [
                    task, str(s["examples"]), str(s["tested"]), str(s["too_short"]), percent(s["exact_rate"]),
                    percent(s["token_match_rate"]),
                    f"{number(zlib_means['memorised'], 0)} / {number(zlib_means['not_memorised'], 0)}",
                ]
            )  # fmt: skip
            if heldout is not None:
                held = heldout if task == "all" else heldout["by_task"].get(task)
                rows[-1].append(f"{percent(held['exact_rate'])} of {held['tested']}" if held else "–")
        heading = (
            f"Memorization of {result['data']} by {result['model']['name']} ({result['name']}): "
            f"prefix {result['prefix_tokens']} tokens, suffix {result['suffix_tokens']}"
        )
        extra = [f"held-out exact ({heldout['data']})"] if heldout is not None else []
        sections.append((heading, ([*headers, *extra], rows)))
    return sections


def _requirements(cfg: MemorizationConfig) -> dict[str, str | tuple[str, ...]]:
    required: dict[str, str | tuple[str, ...]] = {**training_data_step(cfg.data)}
    if cfg.heldout is not None:
        heldout_step = training_data_step(cfg.heldout).get("data")  # none for a file
        if heldout_step is not None:
            required["heldout"] = heldout_step
    return {**required, **required_steps("model", [cfg.model])}


STAGE = Stage(
    KIND,
    MemorizationConfig,
    run_memorization,
    "measure how many training traces a model reproduces verbatim from a prefix",
    produces=lambda cfg: [f"{KIND}:{cfg.name}"],
    requires=_requirements,
)
