"""`score`: annotate existing traces with a teacher's top-k distribution, for logit distillation.

The teacher reads each trace's prompt and completion (teacher forcing) and its k most likely tokens
at every completion position are stored in `logprobs/<name>/logprobs-<shard>.parquet`, keyed by
(problem_id, sample_idx) like the traces. The traces may come from another teacher or the student
itself; the tokens are the teacher's tokenisation of the completion followed by its end-of-turn
token, exactly as the student is trained on it when both share a tokenizer.

    reasondistill score --run-dir runs/x --model testbed:teacher --traces teacher --top-k 32
"""

from __future__ import annotations

from pydantic import Field, model_validator

from ..errors import UserError
from ..generate.backends import BackendOptions, open_generator
from ..generate.logprobs import TokenLogprobs, logprobs_file, read_logprobs, stored_tokens, write_logprobs
from ..generate.shards import (
    RowCodec,
    ShardedJob,
    WorkerOptions,
    finish_sharded_step,
    run_as_worker,
    usage_stats,
    usage_totals,
)
from ..modelref import backend_model, backend_requirements, reference_name
from ..records import Trace
from ..rundir import RunDir
from ..store import problems_by_id, read_traces
from ..ui import note
from .base import Stage


class ScoreConfig(BackendOptions, WorkerOptions):
    model: str = Field(description="the teacher whose distribution is stored (as for generate)")
    traces: str = Field(description="the generate output to annotate: traces/<traces>")
    top_k: int = Field(20, ge=1, le=1024, description="teacher tokens kept per position (20-64 typical)")
    name: str | None = Field(None, description="output name, logprobs/<name> (default: <traces>.<model>)")
    shard_size: int = Field(256, ge=1, description="traces per shard, the unit of resumption")
    batch_size: int = Field(16, ge=1, description="sequences scored together (hf)")

    def output_name(self) -> str:
        return self.name or f"{self.traces}.{reference_name(self.model)}"

    @model_validator(mode="after")
    def _openai_needs_tokenizer(self) -> ScoreConfig:
        if self.backend == "openai" and not self.tokenizer:
            from ..generate.openai import SCORING_NEEDS_TOKENIZER  # aiohttp: imported only when needed

            raise ValueError(SCORING_NEEDS_TOKENIZER)
        return self


def run_score(cfg: ScoreConfig, run: RunDir, overwrite: bool) -> None:
    model = backend_model(cfg, cfg.model, run)
    name = cfg.output_name()
    out = run.logprobs(name)
    inputs = {
        "traces": run.finished_step(f"generate:{cfg.traces}")["fingerprint"],
        "model": model.fingerprint,
    }

    def make_job(step_fingerprint: str) -> tuple[ShardedJob, int]:
        """The job, and how many traces it scores."""
        problems = problems_by_id(run)
        traces = read_traces(run.traces(cfg.traces), problems)
        if not traces:
            raise UserError(f"score:{name}: traces/{cfg.traces} holds no traces to score")

        def process(generator, _shard: int, rows: list[Trace], progress, on_result) -> list:
            prompts = [problems[t.problem_id].messages for t in rows]
            return generator.score(prompts, [t.completion for t in rows], cfg.top_k, progress, on_result)

        def save(shard: int, pairs: list[tuple[Trace, TokenLogprobs]], keep_saved: bool) -> None:
            path = logprobs_file(out, shard)
            rows = [(t.problem_id, t.sample_idx, logprobs) for t, logprobs in pairs]
            if keep_saved and path.exists():
                rows = read_logprobs(path) + rows
            write_logprobs(path, rows)

        def saved_keys(shard: int) -> set[tuple[str, int]]:
            path = logprobs_file(out, shard)
            return (
                {(problem_id, sample) for problem_id, sample, _ in read_logprobs(path)}
                if path.exists()
                else set()
            )

        job = ShardedJob(
            directory=out,
            fingerprint=step_fingerprint,
            shards=[traces[i : i + cfg.shard_size] for i in range(0, len(traces), cfg.shard_size)],
            key=lambda trace: (trace.problem_id, trace.sample_idx),
            process=process,
            save=save,
            saved_keys=saved_keys,
            open_generator=lambda: open_generator(cfg, model.path, cfg.batch_size, cfg.top_k),
            codec=RowCodec(TokenLogprobs.to_json, TokenLogprobs.from_json),
            open_shards=cfg.open_shards,
            workers=cfg.worker(),
        )
        return job, len(traces)

    if cfg.worker_index is not None:
        job, _ = make_job(run.step_fingerprint(f"score:{name}", cfg, inputs))
        run_as_worker(job, f"score {name}")
        return

    def body(step_fingerprint: str) -> dict:
        job, traces = make_job(step_fingerprint)
        index = job.run(f"score {name}", overwrite)
        finish_sharded_step(f"score:{name}", index, cfg.allow_failures)
        usage = usage_stats(index, cfg.pricing, cfg.backend)
        stored = sum(logprobs_file(out, i).stat().st_size for i in sorted(index.finished))
        tokens = sum(stored_tokens(logprobs_file(out, i)) for i in sorted(index.finished))
        return {
            "model": model.path,
            "traces": traces - len(usage["failed"]),
            "tokens": tokens,
            "top_k": cfg.top_k,
            "bytes_per_token": round(stored / max(tokens, 1), 2),
            "usage": usage,
        }

    result = run.step(f"score:{name}", cfg, inputs, body, outputs=[out / "index.json"], overwrite=overwrite)
    run.update_manifest(teacher_usage=usage_totals(run.manifest()))
    stats = result["stats"]
    note(
        f"score:{name}: top-{stats['top_k']} of {stats['traces']} traces, {stats['tokens']} tokens, "
        f"{stats['bytes_per_token']} bytes/token on disk"
    )


STAGE = Stage(
    "score",
    ScoreConfig,
    run_score,
    "store a teacher's top-k distribution over existing traces",
    produces=lambda cfg: [f"score:{cfg.output_name()}"],
    requires=lambda cfg: {"traces": f"generate:{cfg.traces}", **backend_requirements(cfg, cfg.model)},
)
