"""Sharded, resumable jobs over rows: what `generate` and `score` share.

The rows (one per completion: a problem and a sample index) are cut into shards. A shard's files are
written atomically, then `index.json` records the shard as finished, with the rows of it that failed
after their retries, and adds the shard's token usage and wall time. Killing the process at any
moment therefore leaves every shard either recorded or not; a rerun of the same command redoes the
unrecorded shards with the same seeds and retries the failed rows of the recorded ones (adding
only rows whose key is not yet in the shard's files), so no row is lost or written twice. The
index counts the rows still failed and, apart, those a rerun recovered (`recovered`).

With a backend that takes calls from several threads at once (openai), `open_shards` shards are in
flight together: the next shard's requests go out while the slowest request of an earlier one is
still out, so the server is never left idle at a shard boundary. Shards finish in any order; each
is written and recorded as it does (the file names keep the order). There, each row that comes back
is also appended, and flushed, to its shard's journal (`journal-<shard>.jsonl`, deleted once the
shard is recorded), so a job killed mid-shard sends none of its finished requests again: a rerun
takes them from the journal (a last line cut by the kill is ignored).
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Generic, TypeVar

from pydantic import Field, model_validator

from ..config import StageConfig
from ..errors import UserError
from ..records import atomic_write_json
from ..ui import note, progress_bar
from .base import Failure, Generator, ProgressCallback, ResultCallback, Usage

Row = TypeVar("Row")
Result = TypeVar("Result")
RowKey = tuple[str, int]  # (problem_id, sample_idx)


@dataclass(frozen=True)
class Pricing:
    """Optional prices per million tokens, in whatever currency they are given in."""

    prompt_per_1m: float | None = None
    completion_per_1m: float | None = None

    def cost(self, usage: Usage) -> float | None:
        if self.prompt_per_1m is None and self.completion_per_1m is None:
            return None
        return round(
            usage.prompt_tokens / 1e6 * (self.prompt_per_1m or 0)
            + usage.completion_tokens / 1e6 * (self.completion_per_1m or 0),
            6,
        )


USAGE_COUNTS = (
    "requests", "retries", "failures", "recovered_by_rerun", "prompt_tokens", "completion_tokens", "seconds",
)  # fmt: skip


def step_usage(manifest: dict, evaluation: bool = False) -> dict[str, dict]:
    """Each step's usage of a backend, by step key: the steps that call a teacher (generate, score,
    rewrite, chunk), or with `evaluation` the `eval` steps."""
    return {
        key: step["stats"]["usage"]
        for key, step in manifest.get("steps", {}).items()
        if "usage" in step.get("stats", {}) and key.startswith("eval:") == evaluation
    }


def usage_totals(manifest: dict, evaluation: bool = False) -> dict:
    """Usage summed over the steps `step_usage` gives (`teacher_usage` in the manifest)."""
    steps = list(step_usage(manifest, evaluation).values())
    totals = {name: round(sum(u.get(name, 0) for u in steps), 2) for name in USAGE_COUNTS}
    costs = [u["cost"] for u in steps if u["cost"] is not None]
    totals["cost"] = round(sum(costs), 6) if costs else None
    totals["failed_rows"] = sum(len(u["failed"]) for u in steps)
    return totals


@dataclass(frozen=True)
class Workers:
    """A job's shards split over `count` workers (a Slurm job array, machines sharing a filesystem):
    worker `index` takes the shards s with s mod count = index and keeps its own index file, so no
    two workers write the same file. A later call without workers merges their indexes."""

    index: int
    count: int

    def __post_init__(self):
        if not 0 <= self.index < self.count:
            raise UserError(
                f"worker_index: {self.index} is not in [0, {self.count}) (num_workers {self.count})"
            )

    def owns(self, shard: int) -> bool:
        return shard % self.count == self.index

    @property
    def file_name(self) -> str:
        return f"index.worker-{self.index:03d}-of-{self.count:03d}.json"


WORKER_INDEXES = "index.worker-*.json"


class WorkerOptions(StageConfig):
    """Options of a sharded step split over several workers (see `Workers`)."""

    num_workers: int = Field(
        1, ge=1, description="workers the step's shards are split over (e.g. a Slurm array)"
    )
    worker_index: int | None = Field(
        None,
        ge=0,
        description="this worker's index in [0, num_workers): it runs its shards only and leaves the step "
        "unrecorded; a call without worker_index then takes in every worker's shards and finishes the step",
    )
    operational = frozenset({"num_workers", "worker_index"})

    @model_validator(mode="after")
    def _index_in_range(self) -> WorkerOptions:
        if self.worker_index is not None and self.worker_index >= self.num_workers:
            raise ValueError(
                f"worker_index: {self.worker_index} is not below num_workers ({self.num_workers})"
            )
        return self

    def worker(self) -> Workers | None:
        return None if self.worker_index is None else Workers(self.worker_index, self.num_workers)


def run_as_worker(job: ShardedJob, description: str) -> None:
    """One worker's share of a step: its shards run; the step is finished by a call without workers."""
    index = job.run(description, overwrite=False)
    workers = job.workers
    failed = sum(len(index.failures.get(i, [])) for i in index.owned())
    note(
        f"{description}: worker {workers.index} of {workers.count} has {len(index.owned() & index.finished)} "
        f"of its {len(index.owned())} shards ({failed} rows failed); once every worker has finished, run the "
        "same command without --worker-index to finish the step"
    )


class ShardIndex:
    """`index.json` of a sharded output: finished shards, their failed rows, and the usage so far; or,
    for one of several workers, that worker's own index (`Workers.file_name`). The index of a call
    without workers takes in every worker's (and removes their files)."""

    def __init__(
        self,
        directory: Path,
        fingerprint: str,
        shard_count: int,
        overwrite: bool,
        workers: Workers | None = None,
    ):
        self.workers = workers
        self.path = directory / (workers.file_name if workers else "index.json")
        if workers:
            _check_workers(directory, fingerprint, workers, overwrite)
        indexes = [directory / "index.json", *directory.glob(WORKER_INDEXES)]
        if any(json.loads(p.read_text())["fingerprint"] != fingerprint for p in indexes if p.exists()):
            if not overwrite:
                raise UserError(
                    f"{directory}: holds partial output made with other settings; pass --overwrite to discard it"
                )
            shutil.rmtree(directory)
        saved = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.fingerprint, self.shard_count = fingerprint, shard_count
        self.finished: set[int] = set(saved.get("finished", []))
        self.failures: dict[int, list[dict]] = {int(k): v for k, v in saved.get("failures", {}).items()}
        self.usage = Usage(**saved.get("usage", {}))
        self.seconds: float = saved.get("seconds", 0.0)
        self.recovered: int = saved.get("recovered", 0)  # failed rows that a later run completed
        if workers is None:
            self._take_in_workers(directory)
        elif (directory / "index.json").exists():  # shards a call without workers recorded already
            done = json.loads((directory / "index.json").read_text())
            for shard in set(done["finished"]) & self.owned() - self.finished:
                self.finished.add(shard)
                if done["failures"].get(str(shard)):
                    self.failures[shard] = done["failures"][str(shard)]

    def owned(self) -> set[int]:
        """The shards this call is for: all, or a worker's."""
        return {i for i in range(self.shard_count) if self.workers is None or self.workers.owns(i)}

    def _take_in_workers(self, directory: Path) -> None:
        """Add what the workers recorded (their indexes are checked to hold this job: see
        `_check_workers`), write it here, then remove their files."""
        paths = sorted(directory.glob(WORKER_INDEXES))
        if not paths:
            return
        for path in paths:
            saved = json.loads(path.read_text())
            if saved["fingerprint"] != self.fingerprint:
                raise UserError(
                    f"{path}: a worker's index of a job with other settings; delete it, or use --overwrite"
                )
            for shard in saved["finished"]:
                if shard not in self.finished or self.failures.get(shard):
                    self.finished.add(shard)
                    self.failures.pop(shard, None)
                    if saved["failures"].get(str(shard)):
                        self.failures[shard] = saved["failures"][str(shard)]
            self.usage.add(Usage(**saved["usage"]))
            self.seconds += saved["seconds"]
            self.recovered += saved["recovered"]
        self._write()
        for path in paths:
            path.unlink()

    def pending(self) -> list[int]:
        """Shards of this call not written yet, or written with failed rows to retry."""
        return [i for i in sorted(self.owned()) if i not in self.finished or self.failures.get(i)]

    def all_failures(self) -> list[dict]:
        return [row for shard in sorted(self.failures) for row in self.failures[shard]]

    def record(
        self, shard: int, failures: list[dict], usage: Usage, seconds: float, recovered: int = 0
    ) -> None:
        """Shard `shard` is written, with these rows failed; `recovered`: rows of it that had failed
        in an earlier run and are now written."""
        self.finished.add(shard)
        if failures:
            self.failures[shard] = failures
        else:
            self.failures.pop(shard, None)
        self.usage.add(usage)
        self.seconds += seconds
        self.recovered += recovered
        self._write()

    def _write(self) -> None:
        atomic_write_json(
            self.path,
            {
                "fingerprint": self.fingerprint,
                "shards": self.shard_count,
                **({"workers": self.workers.count} if self.workers else {}),
                "finished": sorted(self.finished),
                "failures": {str(k): v for k, v in sorted(self.failures.items())},
                "usage": asdict(self.usage),
                "seconds": round(self.seconds, 3),
                "recovered": self.recovered,
            },
        )


def _check_workers(directory: Path, fingerprint: str, workers: Workers, overwrite: bool) -> None:
    """Refuse, before any request, a worker whose options disagree with the job's other workers (their
    number, the settings) or with a call without workers that began the job with other settings."""
    if overwrite:
        raise UserError(
            "overwrite: a worker does not discard the other workers' output; delete the output folder "
            "first, or pass --overwrite to the call without worker_index"
        )
    for path in sorted(directory.glob(WORKER_INDEXES)) + [directory / "index.json"]:
        if not path.exists() or path.name == workers.file_name:
            continue
        saved = json.loads(path.read_text())
        if saved["fingerprint"] != fingerprint:
            raise UserError(
                f"{path}: written with other settings than this worker's; every worker of a job (and the "
                "final call) must be given the same options"
            )
        if path.name != "index.json" and saved.get("workers") != workers.count:
            raise UserError(
                f"{path}: written by one of {saved.get('workers')} workers, and this is one of "
                f"{workers.count} (num_workers); every worker of a job must be given the same num_workers"
            )


@dataclass(frozen=True)
class RowCodec(Generic[Result]):
    """A job's result as a JSON object and back, for its journal."""

    encode: Callable[[Result], dict]
    decode: Callable[[dict], Result]


class Journal:
    """The rows of an open shard that came back, one JSON line each, appended and flushed as they
    arrive (from the client's thread)."""

    def __init__(self, directory: Path, shard: int, codec: RowCodec):
        self.path, self.codec = directory / f"journal-{shard:05d}.jsonl", codec
        self._lock = threading.Lock()
        directory.mkdir(parents=True, exist_ok=True)

    def read(self) -> dict[RowKey, object]:
        """The journaled results by row key; a last line cut short by a kill is left out."""
        if not self.path.exists():
            return {}
        rows = {}
        lines = self.path.read_text().split("\n")
        for number, line in enumerate(lines):
            if not line:
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                if number == len(lines) - 1:  # the line the kill cut (no newline after it)
                    break
                raise UserError(
                    f"{self.path} line {number + 1}: not JSON; delete the file to redo its rows"
                ) from None
            rows[tuple(entry["key"])] = self.codec.decode(entry["result"])
        return rows

    def append(self, key: RowKey, result: object) -> None:
        line = json.dumps({"key": list(key), "result": self.codec.encode(result)}) + "\n"
        with self._lock, open(self.path, "a") as out:
            out.write(line)
            out.flush()


@dataclass
class ShardedJob(Generic[Row, Result]):
    """Run `process` over the rows of every pending shard and `save` what succeeded.

    `process(generator, shard, rows, progress, on_result)` returns a result or a Failure per row, in
    order (`on_result`, for the backend's call: see `ResultCallback`); `save(shard, pairs, keep_saved)`
    writes the shard's files with these (row, result) pairs, added to the ones already saved when
    `keep_saved` (a retry of failed rows), else replacing whatever a killed run may have left;
    `saved_keys(shard)` are the keys already in the shard's files. `codec`: how results are
    journaled (see the module docstring); `open_shards`: shards in flight at once where the backend
    allows it.
    """

    directory: Path
    fingerprint: str
    shards: Sequence[Sequence[Row]]
    key: Callable[[Row], RowKey]
    process: Callable[
        [Generator, int, Sequence[Row], ProgressCallback, ResultCallback | None], list[Result | Failure]
    ]
    save: Callable[[int, list[tuple[Row, Result]], bool], None]
    saved_keys: Callable[[int], set[RowKey]]
    open_generator: Callable[[], Generator]
    codec: RowCodec | None = None
    open_shards: int = 4
    workers: Workers | None = None

    def run(self, description: str, overwrite: bool) -> ShardIndex:
        index = ShardIndex(self.directory, self.fingerprint, len(self.shards), overwrite, self.workers)
        for shard in index.owned() - set(index.pending()):  # recorded just before a kill
            (self.directory / f"journal-{shard:05d}.jsonl").unlink(missing_ok=True)
        total = sum(len(self.shards[i]) for i in index.owned())
        todo = {i: self._rows_to_do(index, i) for i in index.pending()}
        if not todo:
            return index
        generator = self.open_generator()  # usage counts from zero: this run's throughput
        try:
            self._run_shards(generator, index, todo, description, total)
        finally:
            generator.close()
        return index

    def _run_shards(
        self,
        generator: Generator,
        index: ShardIndex,
        todo: dict[int, list[Row]],
        description: str,
        total: int,
    ) -> None:
        started = time.time()
        concurrent = generator.concurrent_calls and self.open_shards > 1
        with progress_bar(description, total=total) as bar:
            bar.advance(total - sum(len(rows) for rows in todo.values()))

            def advance(count: int) -> None:
                bar.advance(count)
                usage = generator.usage
                elapsed = max(time.time() - started, 1e-9)
                bar.status(
                    f"{usage.completion_tokens / elapsed:,.0f} tok/s out, {usage.prompt_tokens / elapsed:,.0f} in"
                    f" · {usage.retries} retries · {usage.failures} failed"
                )

            recorder = _Recorder(index, generator)

            def finish(shard: int, rows: list[Row], results: list) -> None:
                done = [(row, r) for row, r in zip(rows, results, strict=True) if not isinstance(r, Failure)]
                failed = [
                    {"problem_id": key[0], "sample_idx": key[1], "error": r.error, "attempts": r.attempts}
                    for key, r in zip(map(self.key, rows), results, strict=True)
                    if isinstance(r, Failure)
                ]
                retry = shard in index.finished  # only its failed rows were asked again
                self.save(shard, done, retry)
                recorder.record(shard, failed, recovered=len(done) if retry else 0)
                if self.codec is not None:
                    Journal(self.directory, shard, self.codec).path.unlink(missing_ok=True)

            def one(shard: int, rows: list[Row]) -> tuple[int, list[Row], list]:
                return shard, rows, self._process(generator, shard, rows, advance, bar, journaled=concurrent)

            if not concurrent:
                for shard, rows in todo.items():
                    finish(*one(shard, rows))
            else:
                with ThreadPoolExecutor(self.open_shards, thread_name_prefix="shard") as pool:
                    futures: set[Future] = {pool.submit(one, shard, rows) for shard, rows in todo.items()}
                    try:
                        while futures:
                            finished, futures = wait(futures, return_when=FIRST_COMPLETED)
                            for future in finished:
                                finish(*future.result())
                    finally:
                        for future in futures:  # after a fatal error: shards not started stay so
                            future.cancel()

    def _process(
        self, generator: Generator, shard: int, rows: list[Row], advance, bar, journaled: bool
    ) -> list:
        """The shard's results, row for row: from its journal where a killed run left them, else sent."""
        if not journaled or self.codec is None:
            return self.process(generator, shard, rows, advance, None)
        journal = Journal(self.directory, shard, self.codec)
        saved = journal.read()
        send = [row for row in rows if self.key(row) not in saved]
        bar.advance(len(rows) - len(send))

        def on_result(position: int, result: object) -> None:
            if not isinstance(result, Failure):
                journal.append(self.key(send[position]), result)

        results = iter(self.process(generator, shard, send, advance, on_result) if send else [])
        return [saved[self.key(row)] if self.key(row) in saved else next(results) for row in rows]

    def _rows_to_do(self, index: ShardIndex, shard: int) -> list[Row]:
        rows = self.shards[shard]
        if shard not in index.finished:
            return list(rows)
        saved = self.saved_keys(shard)
        failed = {(f["problem_id"], f["sample_idx"]) for f in index.failures[shard]}
        return [row for row in rows if self.key(row) in failed and self.key(row) not in saved]


class _Recorder:
    """Records finished shards in the index with the usage and wall time since the last record (shards
    overlap, so usage is not told apart by shard: the index keeps totals)."""

    def __init__(self, index: ShardIndex, generator: Generator):
        self.index, self.generator = index, generator
        self.usage, self.time = _copy(generator.usage), time.time()

    def record(self, shard: int, failed: list[dict], recovered: int) -> None:
        now, usage = time.time(), _copy(self.generator.usage)
        self.index.record(shard, failed, _difference(usage, self.usage), now - self.time, recovered=recovered)
        self.usage, self.time = usage, now


def _copy(usage: Usage) -> Usage:
    return Usage(**asdict(usage))


def _difference(after: Usage, before: Usage) -> Usage:
    difference = _copy(after)
    difference.add(before, sign=-1)
    return difference


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
