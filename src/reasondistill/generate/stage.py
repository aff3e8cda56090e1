"""`generate`: a teacher writes n completions per problem, into resumable shards.

Problems are cut into shards of `shard_size`; each finished shard is written atomically and then
recorded in `traces/<name>/index.json`. A rerun after a crash skips the recorded shards and redoes
the rest, with the same per-shard seeds, so no row is lost or duplicated.
"""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Literal

from pydantic import Field

from ..errors import UserError
from ..modelref import reference_name, required_steps, resolve_model
from ..records import Problem, Trace, atomic_write_json, read_records, write_records
from ..rundir import RunDir, fingerprint
from ..stages import Stage, StageConfig
from ..tasks.stage import ProblemSelection, load_problems
from ..ui import note, progress_bar
from ..verify.reasoning import split_reasoning
from .base import Completion, Generator, SamplingParams
from .hf import HFGenerator


class SamplingOptions(StageConfig):
    """Decoding options shared by every stage that generates (generate, eval)."""

    n: int = Field(4, ge=1, description="completions per problem")
    temperature: float = Field(0.8, ge=0, description="sampling temperature (0: greedy)")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling mass")
    top_k: int = Field(0, ge=0, description="top-k filtering (0: off)")
    max_new_tokens: int = Field(
        512, ge=1, description="completion token limit; longer ones are cut and unparseable"
    )
    batch_size: int = Field(64, ge=1, description="sequences decoded together")
    seed: int = Field(0, description="sampling seed")

    def sampling(self, n: int, temperature: float, seed: int) -> SamplingParams:
        return SamplingParams(
            n=n,
            temperature=temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            max_new_tokens=self.max_new_tokens,
            seed=seed,
        )


class GenerateConfig(SamplingOptions, ProblemSelection):
    model: str = Field(
        description="teacher: testbed:teacher, a model trained in this run, a model folder or a Hub id"
    )
    name: str | None = Field(None, description="output name, traces/<name> (default: the model's name)")
    backend: Literal["hf"] = Field("hf", description="generation backend")
    split: Literal["train", "test"] = Field("train", description="which problems to answer")
    shard_size: int = Field(256, ge=1, description="problems per shard, the unit of resumption")


def make_traces(problem: Problem, completions: list[Completion], source: str) -> list[Trace]:
    traces = []
    for sample_idx, completion in enumerate(completions):
        split = split_reasoning(completion.text)
        traces.append(
            Trace(
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
        )
    return traces


def shard_seed(seed: int, shard: int) -> int:
    return int(fingerprint([seed, shard]), 16) % 2**31


def trace_shards(directory: Path) -> list[Path]:
    """The shard files of a finished `generate` output, in order."""
    index = json.loads((directory / "index.json").read_text())
    return [directory / f"shard-{i:05d}.parquet" for i in sorted(index["finished"])]


def run_generate(cfg: GenerateConfig, run: RunDir, overwrite: bool) -> None:
    model = resolve_model(cfg.model, run)
    name = cfg.name or model.name
    problems = load_problems(run, cfg, cfg.split)
    inputs = {"problems": run.finished_step("problems")["fingerprint"], "model": model.fingerprint}

    def body(step_fingerprint: str) -> dict:
        out = run.traces(name)
        index_path = out / "index.json"
        index = json.loads(index_path.read_text()) if index_path.exists() else None
        if index and index["fingerprint"] != step_fingerprint:
            if not overwrite:
                raise UserError(
                    f"{out}: holds partial traces made with other settings; pass --overwrite to discard them"
                )
            shutil.rmtree(out)
            index = None
        shards = [problems[i : i + cfg.shard_size] for i in range(0, len(problems), cfg.shard_size)]
        finished = set(index["finished"]) if index else set()
        sampling = cfg.sampling(cfg.n, cfg.temperature, cfg.seed)
        source = json.dumps(
            {
                "model": model.name,
                "path": model.path,
                "backend": cfg.backend,
                "sampling": asdict(sampling),
                "sampling_hash": sampling.fingerprint(),
            }
        )
        generator: Generator | None = None
        started, tokens = time.time(), 0
        with progress_bar(f"generate {name}", total=len(problems) * cfg.n, unit="completions") as bar:
            bar.advance(sum(len(shards[i]) for i in finished) * cfg.n)
            for i, shard in enumerate(shards):
                if i in finished:
                    continue
                generator = generator or HFGenerator(model.path, batch_size=cfg.batch_size)
                completions = generator.generate(
                    [p.messages for p in shard],
                    cfg.sampling(cfg.n, cfg.temperature, shard_seed(cfg.seed, i)),
                    progress=bar.advance,
                )
                traces = [
                    t for p, c in zip(shard, completions, strict=True) for t in make_traces(p, c, source)
                ]
                write_records(out / f"shard-{i:05d}.parquet", traces, Trace)
                finished.add(i)
                atomic_write_json(
                    index_path,
                    {"fingerprint": step_fingerprint, "shards": len(shards), "finished": sorted(finished)},
                )
                tokens += sum(t.completion_tokens for t in traces)
                bar.status(f"{tokens / (time.time() - started):.0f} tok/s")
        return {"model": model.path, **_trace_stats(out)}

    outputs = [run.traces(name) / "index.json"]
    result = run.step(f"generate:{name}", cfg, inputs, body, outputs=outputs, overwrite=overwrite)
    stats = result["stats"]
    note(
        f"generate:{name}: {stats['traces']} traces, {stats['completion_tokens']} tokens, finish {stats['finish_reasons']}"
    )


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
    requires=lambda cfg: {"problems": "problems", **required_steps("model", [cfg.model])},
)
