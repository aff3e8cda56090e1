"""A teacher asked once per row, in resumable shards: what `rewrite` (one DAP rewrite per trace) and
`chunk` (one labelling per trace) share.

The rows' replies are Trace rows in shard files of one directory, written with `generate`'s
ShardedJob: a killed job continues where it stopped, with no row lost or written twice, and failed
requests stop the step as in `generate` unless `allow_failures`. Also here: counting the lengths of
texts in a tokenizer's tokens (or words), which both stages report.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from pydantic import Field

from ..errors import UserError
from ..generate.backends import BackendOptions, open_generator
from ..generate.base import (
    Completion,
    Generator,
    Samples,
    Temperature,
    completion_from_json,
    completion_to_json,
    make_trace,
    row_seed,
)
from ..generate.sampling import SamplingOptions
from ..generate.shards import RowCodec, ShardedJob, ShardIndex, finish_sharded_step
from ..modelref import ResolvedModel, resolve_model, trained_in_run
from ..records import Message, Problem, Trace, read_records, write_records
from ..rundir import RunDir
from ..testbed.refs import TESTBED_PREFIX


class TeacherOptions(SamplingOptions, BackendOptions):
    """A teacher called once per row (a rewrite, a labelling): backend and sampling options."""

    n: Samples = Field(1, le=1, description="one reply per row")
    temperature: Temperature = Field(0.0, description="sampling temperature (0: greedy, as DAP)")
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
    """What the replies come from (model, backend, sampling, and `extra`), as stored in their `source`."""
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

    sampling = cfg.sampling(1, cfg.temperature, cfg.seed)  # each row is seeded alone (`row_seed`)

    def process(generator: Generator, shard: int, batch: Sequence[PromptRow], progress, on_result) -> list:
        seeds = [row_seed(cfg.seed, r.problem.id, r.sample_idx) for r in batch]  # a rerun redraws the same
        replies = generator.generate(
            [r.messages for r in batch], sampling, progress, seeds=seeds, on_result=on_result
        )
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
        open_generator=lambda: open_generator(cfg, model.path, cfg.batch_size, 0),
        codec=RowCodec(completion_to_json, completion_from_json),
        open_shards=cfg.open_shards,
    )
    index = job.run(step_key.replace(":", " "), overwrite)
    finish_sharded_step(step_key, index, cfg.allow_failures)
    replies = {}
    for shard in sorted(index.finished):  # the shards its index.json lists as finished
        replies.update({(t.problem_id, t.sample_idx): t for t in read_records(shard_path(shard), Trace)})
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
