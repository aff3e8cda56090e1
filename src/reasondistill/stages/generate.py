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
import logging
from collections import Counter
from dataclasses import asdict, replace
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from ..generate.backends import BackendOptions, open_generator
from ..generate.base import (
    Completion,
    Generator,
    SamplingParams,
    completion_from_json,
    completion_to_json,
    make_trace,
    row_seed,
)
from ..generate.logprobs import logprobs_file, read_logprobs, write_logprobs
from ..generate.sampling import SamplingOptions
from ..generate.shards import (
    RowCodec,
    ShardedJob,
    WorkerOptions,
    finish_sharded_step,
    run_as_worker,
    usage_stats,
    usage_totals,
)
from ..modelref import backend_model, backend_requirements, reference_name, required_steps, resolve_model
from ..models import model_sampling_defaults
from ..records import Problem, Trace, atomic_write_json, read_records, write_records
from ..rundir import RunDir
from ..store import load_problems, trace_shards
from ..tasks.selection import ProblemSelection
from ..ui import note
from .base import Stage

log = logging.getLogger(__name__)


class GenerateConfig(SamplingOptions, ProblemSelection, BackendOptions, WorkerOptions):
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
            from ..generate.openai import COMPLETIONS_NEED_TOKENIZER  # aiohttp: imported only when needed

            raise ValueError(COMPLETIONS_NEED_TOKENIZER)
        return self


def default_trace_name(teacher: str, gate: str | None) -> str:
    """traces/<teacher>, or traces/<teacher>-rsd-<student> for student-gated traces."""
    return f"{teacher}-rsd-{gate}" if gate else teacher


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

    # every backend seeds each row alone, so a row's completion depends on neither its shard nor its batch
    sampling = _row_sampling(cfg)

    def process(generator: Generator, shard: int, samples, progress, on_result) -> list:
        seeds = [row_seed(cfg.seed, p.id, j) for p, j in samples]
        results = generator.generate(
            [p.messages for p, _ in samples], sampling, progress, seeds=seeds, on_result=on_result
        )
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

    def make_job(step_fingerprint: str) -> ShardedJob:
        return ShardedJob(
            directory=out,
            fingerprint=step_fingerprint,
            shards=[rows[i : i + cfg.shard_size] for i in range(0, len(rows), cfg.shard_size)],
            key=lambda sample: (sample[0].id, sample[1]),
            process=process,
            save=save,
            saved_keys=saved_keys,
            open_generator=lambda: open_generator(
                cfg,
                model.path,
                cfg.batch_size,
                cfg.top_logprobs,
                (gate.path, cfg.gate_threshold) if gate else None,
            ),
            codec=RowCodec(completion_to_json, completion_from_json),
            open_shards=cfg.open_shards,
            workers=cfg.worker(),
        )

    if cfg.worker_index is not None:
        run_as_worker(make_job(run.step_fingerprint(f"generate:{name}", cfg, inputs)), f"generate {name}")
        return

    def body(step_fingerprint: str) -> dict:
        index = make_job(step_fingerprint).run(f"generate {name}", overwrite)
        finish_sharded_step(f"generate:{name}", index, cfg.allow_failures)
        not_applied = model_sampling_defaults(model.path) if cfg.backend in ("hf", "vllm") else {}
        return {
            "model": model.path,
            # the model's own sampling defaults, which these backends leave out (the config's are used)
            **({"generation_config_not_applied": not_applied} if not_applied else {}),
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
    warn_cut(
        f"generate:{name}", stats["finish_reasons"].get("length", 0), stats["traces"], cfg.max_new_tokens
    )


def warn_cut(step: str, cut: int, traces: int, max_new_tokens: int) -> None:
    """One warning per step when traces reached the token limit: most have no final answer to grade."""
    if cut:
        log.warning(
            "%s: %d of %d traces (%.0f%%) reached max_new_tokens=%d and were cut before they finished; "
            "verify grades most of them unparseable (raise max_new_tokens for long reasoning)",
            step, cut, traces, 100 * cut / traces, max_new_tokens,
        )  # fmt: skip


def _row_sampling(cfg: GenerateConfig) -> SamplingParams:
    """One completion per row: rows of the same problem differ by their row seeds (`row_seed`)."""
    return replace(
        cfg.sampling(1, cfg.temperature, cfg.seed), logprobs=cfg.logprobs, top_logprobs=cfg.top_logprobs
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
