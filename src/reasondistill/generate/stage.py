"""`generate`: a teacher writes n completions per problem, into resumable shards.

One row per (problem, sample index), cut into shards of `shard_size` rows (see shards.py for how a
killed job resumes with no row lost or duplicated, and how failed requests are kept and retried).
Each row is sampled with a seed of its own, `row_seed(seed, problem_id, sample_idx)`, by the backends
that seed each request (openai, vllm), so the rows a rerun asks for again come out as they would
have the first time; the hf backend seeds each shard's call once (see hf.py), which is exact too, as
it never leaves a shard partly done.
With `logprobs` / `top_logprobs` the teacher's distribution over each completion goes to
`traces/<name>/logprobs-<shard>.parquet` beside the traces (see logprobs.py for the layout).
With `gate_model` a student gates the teacher's tokens (RSD, see rsd.py); each shard's count of
rejected tokens goes to `traces/<name>/gate-<shard>.json`, so a resumed job reports them all.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, replace
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from ..errors import UserError
from ..modelref import reference_name, required_steps, resolve_model
from ..records import Problem, Trace, atomic_write_json, read_records, write_records
from ..rundir import RunDir, fingerprint
from ..stages import Stage, StageConfig
from ..tasks.stage import ProblemSelection, load_problems
from ..ui import note
from ..verify.reasoning import split_reasoning
from .backends import BackendOptions, backend_model, backend_requirements, open_generator
from .base import Completion, Generator, SamplingParams, row_seed
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
    gate_model: str | None = Field(
        None,
        description="student-gated decoding (RSD): the student that accepts or rejects each teacher token "
        "(like model: testbed:student, a model trained in this run, a folder, a Hub id); hf backend only",
    )
    # The paper's exact threshold was not recovered; 1% is a plausible default: it rejects only tokens
    # the student gives less than a 1-in-100 chance, far above the ~1/|V| of a token it knows nothing of.
    gate_threshold: float = Field(
        0.01,
        gt=0,
        le=1,
        description="RSD: the student keeps a teacher token it gives at least this probability, "
        "else puts its own token in its place",
    )

    @model_validator(mode="after")
    def _gate_runs_locally(self) -> GenerateConfig:
        if self.gate_model and self.backend != "hf":
            raise ValueError(
                f"gate_model: student-gated decoding needs both models on this machine (backend hf), "
                f"not backend {self.backend}"
            )
        return self

    @model_validator(mode="after")
    def _options_fit_together(self) -> GenerateConfig:
        """Combinations no request could serve, refused before anything runs."""
        if self.temperature == 0 and self.n > 1:
            raise ValueError(
                f"n: greedy decoding (temperature 0) gives one completion per problem, not {self.n}; "
                "set n: 1 or a temperature above 0"
            )
        if "" in self.stop:
            raise ValueError("stop: an empty string would end every completion at once")
        if self.backend == "openai" and self.endpoint == "completions" and not self.tokenizer:
            from .openai import COMPLETIONS_NEED_TOKENIZER  # here: aiohttp is imported only when needed

            raise ValueError(COMPLETIONS_NEED_TOKENIZER)
        return self


def default_trace_name(teacher: str, gate: str | None) -> str:
    """traces/<teacher>, or traces/<teacher>-rsd-<student> for student-gated traces."""
    return f"{teacher}-rsd-{gate}" if gate else teacher


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


def read_traces(directory: Path, problems: dict[str, Problem]) -> list[Trace]:
    """Every trace of a finished `generate` output; a trace of a problem not in `problems` (the run's
    problems by id) is a UserError naming its shard and row."""
    traces = []
    for shard in trace_shards(directory):
        for row, trace in enumerate(read_records(shard, Trace)):
            if trace.problem_id not in problems:
                raise UserError(
                    f"{shard} row {row}: problem_id {trace.problem_id!r} is not a problem of this run"
                )
            traces.append(trace)
    return traces


def logprob_shards(directory: Path) -> list[Path]:
    """The teacher-distribution files beside the traces (generate with logprobs) or of `score`."""
    index = json.loads((directory / "index.json").read_text())
    return [logprobs_file(directory, i) for i in sorted(index["finished"])]


def usage_stats(index: ShardIndex, pricing: Pricing, generator: str) -> dict:
    """Tokens, time and money of a sharded step, for the manifest and the report.

    `failures` counts the rows still failed when the step ended (listed in `failed`), not every
    request that ever failed: a row a rerun recovered is counted in `recovered_by_rerun` instead;
    `retries` counts the attempts repeated within the runs."""
    failed = index.all_failures()
    return {
        "backend": generator,
        **asdict(index.usage),
        "failures": len(failed),
        "recovered_by_rerun": index.recovered,
        "seconds": round(index.seconds, 2),
        "cost": pricing.cost(index.usage),
        "failed": failed,
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
    gate = resolve_model(cfg.gate_model, run) if cfg.gate_model else None
    name = cfg.name or default_trace_name(model.name, gate.name if gate else None)
    problems = load_problems(run, cfg, cfg.split, step=f"generate:{name}")
    inputs = {"problems": run.finished_step("problems")["fingerprint"], "model": model.fingerprint}
    provenance = {"model": model.name, "path": model.path, "backend": cfg.backend}
    if gate:
        inputs["gate_model"] = gate.fingerprint
        provenance["gate"] = {"model": gate.name, "path": gate.path, "threshold": cfg.gate_threshold}
    source = json.dumps({**provenance, **_sampling_source(cfg)})
    out = run.traces(name)
    rows: list[Sample] = [(p, j) for p in problems for j in range(cfg.n)]

    def process(generator: Generator, shard: int, samples, progress) -> list:
        # the shard's seed drives the hf backend's one random stream; the others seed every row alone
        sampling = _row_sampling(cfg, shard_seed(cfg.seed, shard))
        seeds = [row_seed(cfg.seed, p.id, j) for p, j in samples]
        results = generator.generate([p.messages for p, _ in samples], sampling, progress, seeds=seeds)
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
        if gate:
            counts = Counter(
                tokens=sum(c.completion_tokens for _, c in pairs), rejected=sum(c.rejected for _, c in pairs)
            )
            if keep_saved and gate_file(out, shard).exists():
                counts.update(json.loads(gate_file(out, shard).read_text()))
            atomic_write_json(gate_file(out, shard), dict(counts))
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
            open_generator=lambda: open_generator(
                cfg, model, cfg.batch_size, cfg.top_logprobs, (gate, cfg.gate_threshold) if gate else None
            ),
        )
        index = job.run(f"generate {name}", overwrite)
        finish_sharded_step(f"generate:{name}", index, cfg.allow_failures)
        return {
            "model": model.path,
            **_trace_stats(out),
            **({"gate": _gate_stats(out, gate.path, cfg.gate_threshold)} if gate else {}),
            "usage": usage_stats(index, cfg.pricing, cfg.backend),
        }

    outputs = [out / "index.json"]
    result = run.step(f"generate:{name}", cfg, inputs, body, outputs=outputs, overwrite=overwrite)
    run.update_manifest(teacher_usage=usage_totals(run.manifest()))
    stats = result["stats"]
    gate_note = (
        f", student gate rejected {stats['gate']['rejection_rate']:.1%} of the teacher's tokens"
        if "gate" in stats
        else ""
    )
    note(
        f"generate:{name}: {stats['traces']} traces, {stats['completion_tokens']} tokens, "
        f"finish {stats['finish_reasons']}{gate_note}{_cost_note(stats['usage'])}"
    )


def _row_sampling(cfg: GenerateConfig, seed: int) -> SamplingParams:
    """One completion per row: rows of the same problem differ by their place in the batch."""
    return replace(
        cfg.sampling(1, cfg.temperature, seed), logprobs=cfg.logprobs, top_logprobs=cfg.top_logprobs
    )


def _sampling_source(cfg: GenerateConfig) -> dict:
    """The step's sampling settings as every trace records them (logprobs included)."""
    sampling = replace(
        cfg.sampling(cfg.n, cfg.temperature, cfg.seed),
        logprobs=cfg.logprobs or cfg.top_logprobs > 0,
        top_logprobs=cfg.top_logprobs,
    )
    return {"sampling": asdict(sampling), "sampling_hash": sampling.fingerprint()}


def _cost_note(usage: dict) -> str:
    parts = [f"{usage['seconds']:.0f} s"]
    if usage["retries"] or usage["failures"] or usage["recovered_by_rerun"]:
        parts.append(
            f"{usage['retries']} retries, {usage['failures']} rows failed, "
            f"{usage['recovered_by_rerun']} recovered by a rerun"
        )
    if usage["cost"] is not None:
        parts.append(f"cost {usage['cost']:.4f}")
    return "; " + ", ".join(parts)


def gate_file(directory: Path, shard: int) -> Path:
    return directory / f"gate-{shard:05d}.json"


def _gate_stats(directory: Path, gate: str, threshold: float) -> dict:
    """The student gate's decisions over every finished shard (RSD's key diagnostic: how many
    of the teacher's tokens the student could not follow)."""
    index = json.loads((directory / "index.json").read_text())
    counts = Counter()
    for shard in index["finished"]:
        counts.update(json.loads(gate_file(directory, shard).read_text()))
    return {
        "model": gate,
        "threshold": threshold,
        "tokens": counts["tokens"],
        "rejected": counts["rejected"],
        "rejection_rate": round(counts["rejected"] / max(counts["tokens"], 1), 4),
    }


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
    produces=lambda cfg: [
        "generate:"
        + (
            cfg.name
            or default_trace_name(
                reference_name(cfg.model), cfg.gate_model and reference_name(cfg.gate_model)
            )
        )
    ],
    requires=lambda cfg: {
        "problems": "problems",
        **backend_requirements(cfg, cfg.model),
        **(required_steps("gate_model", [cfg.gate_model]) if cfg.gate_model else {}),
    },
)
