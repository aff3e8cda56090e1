"""`generate`: a teacher writes n completions per problem, into resumable shards.

One row per (problem, sample index), cut into shards of `shard_size` rows (see shards.py for how a
killed job resumes with no row lost or duplicated, and how failed requests are kept and retried).
With `logprobs` / `top_logprobs` the teacher's distribution over each completion goes to
`traces/<name>/logprobs-<shard>.parquet` beside the traces (see logprobs.py for the layout).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, replace
from pathlib import Path
from typing import Literal

from pydantic import Field

from ..errors import UserError
from ..modelref import reference_name
from ..records import Problem, Trace, read_records, write_records
from ..rundir import RunDir, fingerprint
from ..stages import Stage, StageConfig
from ..tasks.stage import ProblemSelection, load_problems
from ..ui import note
from ..verify.reasoning import split_reasoning
from .backends import BackendOptions, backend_model, backend_requirements, open_generator
from .base import Completion, Generator, SamplingParams
from .logprobs import logprobs_file, read_logprobs, write_logprobs
from .shards import Pricing, ShardedJob, ShardIndex, usage_totals


class SamplingOptions(StageConfig):
    """Decoding options shared by every stage that generates (generate, eval)."""

    n: int = Field(4, ge=1, description="completions per problem")
    temperature: float = Field(0.8, ge=0, description="sampling temperature (0: greedy)")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling mass")
    top_k: int = Field(0, ge=0, description="top-k filtering (0: off)")
    max_new_tokens: int = Field(
        512, ge=1, description="completion token limit; longer ones are cut and unparseable"
    )
    stop: list[str] = Field([], description="strings that end a completion (left out of its text)")
    batch_size: int = Field(64, ge=1, description="sequences decoded together (hf)")
    seed: int = Field(0, description="sampling seed")

    def sampling(self, n: int, temperature: float, seed: int) -> SamplingParams:
        return SamplingParams(
            n=n,
            temperature=temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            max_new_tokens=self.max_new_tokens,
            seed=seed,
            stop=tuple(self.stop),
        )


class GenerateConfig(SamplingOptions, ProblemSelection, BackendOptions):
    model: str = Field(
        description="teacher: testbed:teacher, a model trained in this run, a model folder, a Hub id, "
        "or (backend openai) the name the server knows it by"
    )
    name: str | None = Field(None, description="output name, traces/<name> (default: the model's name)")
    split: Literal["train", "test"] = Field("train", description="which problems to answer")
    shard_size: int = Field(256, ge=1, description="completions per shard, the unit of resumption")
    logprobs: bool = Field(False, description="store the logprob of every generated token")
    top_logprobs: int = Field(
        0, ge=0, description="also store the teacher's k most likely tokens at every position (20-64 typical)"
    )


def make_traces(problem: Problem, completions: list[Completion], source: str) -> list[Trace]:
    return [make_trace(problem, sample_idx, c, source) for sample_idx, c in enumerate(completions)]


def make_trace(problem: Problem, sample_idx: int, completion: Completion, source: str) -> Trace:
    split = split_reasoning(completion.text)
    return Trace(
        problem_id=problem.id,
        task=problem.task,
        sample_idx=sample_idx,
        source=source,
        completion=completion.text,
        reasoning=split.reasoning,
        final=split.final,
        prompt_tokens=completion.prompt_tokens,
        completion_tokens=completion.completion_tokens,
        finish_reason=completion.finish_reason,
    )


def shard_seed(seed: int, shard: int) -> int:
    return int(fingerprint([seed, shard]), 16) % 2**31


def trace_shards(directory: Path) -> list[Path]:
    """The shard files of a finished `generate` output, in order."""
    index = json.loads((directory / "index.json").read_text())
    return [directory / f"shard-{i:05d}.parquet" for i in sorted(index["finished"])]


def logprob_shards(directory: Path) -> list[Path]:
    """The teacher-distribution files beside the traces (generate with logprobs) or of `score`."""
    index = json.loads((directory / "index.json").read_text())
    return [logprobs_file(directory, i) for i in sorted(index["finished"])]


def usage_stats(index: ShardIndex, pricing: Pricing, generator: str) -> dict:
    """Tokens, time and money of a sharded step, for the manifest and the report."""
    return {
        "backend": generator,
        **asdict(index.usage),
        "seconds": round(index.seconds, 2),
        "cost": pricing.cost(index.usage),
        "failed": index.all_failures(),
    }


def finish_sharded_step(key: str, index: ShardIndex, allow_failures: bool) -> None:
    """Failed rows stop the step (a rerun retries them) unless the user accepts them."""
    failures = index.all_failures()
    if not failures:
        return
    first = failures[0]
    message = (
        f"{key}: {len(failures)} request(s) failed after their retries, e.g. {first['problem_id']} "
        f"sample {first['sample_idx']}: {first['error']} (all listed in {index.path})"
    )
    if not allow_failures:
        raise UserError(f"{message}; rerun the same command to retry them, or set allow_failures")
    note(f"[yellow]warning:[/] {message}; kept out of the output (allow_failures)")


Sample = tuple[Problem, int]  # a problem and a sample index: one row of the output


def run_generate(cfg: GenerateConfig, run: RunDir, overwrite: bool) -> None:
    model = backend_model(cfg, cfg.model, run)
    name = cfg.name or model.name
    problems = load_problems(run, cfg, cfg.split)
    inputs = {"problems": run.finished_step("problems")["fingerprint"], "model": model.fingerprint}
    source = json.dumps(
        {"model": model.name, "path": model.path, "backend": cfg.backend, **_sampling_source(cfg)}
    )
    out = run.traces(name)
    rows: list[Sample] = [(p, j) for p in problems for j in range(cfg.n)]

    def process(generator: Generator, shard: int, samples, progress) -> list:
        sampling = _row_sampling(cfg, shard_seed(cfg.seed, shard))
        results = generator.generate([p.messages for p, _ in samples], sampling, progress)
        return [completions[0] for completions in results]

    def save(shard: int, pairs: list[tuple[Sample, Completion]], keep_saved: bool) -> None:
        path = out / f"shard-{shard:05d}.parquet"
        traces = [make_trace(p, j, c, source) for (p, j), c in pairs]
        logprobs = [(p.id, j, c.logprobs) for (p, j), c in pairs if c.logprobs is not None]
        logprobs_path = logprobs_file(out, shard)
        if keep_saved and path.exists():
            traces = read_records(path, Trace) + traces
            if logprobs_path.exists():
                logprobs = read_logprobs(logprobs_path) + logprobs
        if cfg.logprobs or cfg.top_logprobs:
            write_logprobs(logprobs_path, logprobs)
        write_records(path, traces, Trace)

    def saved_keys(shard: int) -> set[tuple[str, int]]:
        path = out / f"shard-{shard:05d}.parquet"
        return {(t.problem_id, t.sample_idx) for t in read_records(path, Trace)} if path.exists() else set()

    def body(step_fingerprint: str) -> dict:
        job = ShardedJob(
            directory=out,
            fingerprint=step_fingerprint,
            shards=[rows[i : i + cfg.shard_size] for i in range(0, len(rows), cfg.shard_size)],
            key=lambda sample: (sample[0].id, sample[1]),
            process=process,
            save=save,
            saved_keys=saved_keys,
            open_generator=lambda: open_generator(cfg, model, cfg.batch_size, cfg.top_logprobs),
        )
        index = job.run(f"generate {name}", overwrite)
        finish_sharded_step(f"generate:{name}", index, cfg.allow_failures)
        return {
            "model": model.path,
            **_trace_stats(out),
            "usage": usage_stats(index, cfg.pricing, cfg.backend),
        }

    outputs = [out / "index.json"]
    result = run.step(f"generate:{name}", cfg, inputs, body, outputs=outputs, overwrite=overwrite)
    run.update_manifest(teacher_usage=usage_totals(run.manifest()))
    stats = result["stats"]
    note(
        f"generate:{name}: {stats['traces']} traces, {stats['completion_tokens']} tokens, "
        f"finish {stats['finish_reasons']}{_cost_note(stats['usage'])}"
    )


def _row_sampling(cfg: GenerateConfig, seed: int) -> SamplingParams:
    """One completion per row: rows of the same problem differ by their place in the batch."""
    return replace(
        cfg.sampling(1, cfg.temperature, seed), logprobs=cfg.logprobs, top_logprobs=cfg.top_logprobs
    )


def _sampling_source(cfg: GenerateConfig) -> dict:
    sampling = cfg.sampling(cfg.n, cfg.temperature, cfg.seed)
    return {"sampling": asdict(sampling), "sampling_hash": sampling.fingerprint()}


def _cost_note(usage: dict) -> str:
    parts = [f"{usage['seconds']:.0f} s"]
    if usage["retries"] or usage["failures"]:
        parts.append(f"{usage['retries']} retries, {usage['failures']} failed attempts")
    if usage["cost"] is not None:
        parts.append(f"cost {usage['cost']:.4f}")
    return "; " + ", ".join(parts)


def _trace_stats(directory: Path) -> dict:
    traces = [t for shard in trace_shards(directory) for t in read_records(shard, Trace)]
    return {
        "traces": len(traces),
        "problems": len({t.problem_id for t in traces}),
        "completion_tokens": sum(t.completion_tokens for t in traces),
        "prompt_tokens": sum(t.prompt_tokens for t in traces),
        "finish_reasons": dict(Counter(t.finish_reason for t in traces)),
    }


STAGE = Stage(
    "generate",
    GenerateConfig,
    run_generate,
    "sample n completions per problem from a teacher",
    produces=lambda cfg: [f"generate:{cfg.name or reference_name(cfg.model)}"],
    requires=lambda cfg: {"problems": "problems", **backend_requirements(cfg, cfg.model)},
)
