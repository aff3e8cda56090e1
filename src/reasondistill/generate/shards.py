"""Sharded, resumable jobs over rows: what `generate` and `score` share.

The rows (one per completion: a problem and a sample index) are cut into shards. A shard's files are
written atomically, then `index.json` records the shard as finished, with the rows of it that failed
after their retries, and adds the shard's token usage and wall time. Killing the process at any
moment therefore leaves every shard either recorded or not; a rerun of the same command redoes the
unrecorded shards with the same seeds and retries the failed rows of the recorded ones (adding
only rows whose key is not yet in the shard's files), so no row is lost or written twice. The
index counts the rows still failed and, apart, those a rerun recovered (`recovered`).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Generic, TypeVar

from ..errors import UserError
from ..records import atomic_write_json
from ..rundir import fingerprint
from ..ui import note, progress_bar
from .base import Failure, Generator, ProgressCallback, Usage

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


def usage_totals(manifest: dict) -> dict:
    """Teacher usage summed over every generate / score step of a run (`teacher_usage` in the manifest)."""
    steps = [
        step["stats"]["usage"]
        for step in manifest.get("steps", {}).values()
        if "usage" in step.get("stats", {})
    ]
    totals = {name: round(sum(u.get(name, 0) for u in steps), 2) for name in USAGE_COUNTS}
    costs = [u["cost"] for u in steps if u["cost"] is not None]
    totals["cost"] = round(sum(costs), 6) if costs else None
    totals["failed_rows"] = sum(len(u["failed"]) for u in steps)
    return totals


class ShardIndex:
    """`index.json` of a sharded output: finished shards, their failed rows, and the usage so far."""

    def __init__(self, directory: Path, fingerprint: str, shard_count: int, overwrite: bool):
        self.path = directory / "index.json"
        saved = json.loads(self.path.read_text()) if self.path.exists() else None
        if saved and saved["fingerprint"] != fingerprint:
            if not overwrite:
                raise UserError(
                    f"{directory}: holds partial output made with other settings; pass --overwrite to discard it"
                )
            shutil.rmtree(directory)
            saved = None
        saved = saved or {}
        self.fingerprint, self.shard_count = fingerprint, shard_count
        self.finished: set[int] = set(saved.get("finished", []))
        self.failures: dict[int, list[dict]] = {int(k): v for k, v in saved.get("failures", {}).items()}
        self.usage = Usage(**saved.get("usage", {}))
        self.seconds: float = saved.get("seconds", 0.0)
        self.recovered: int = saved.get("recovered", 0)  # failed rows that a later run completed

    def pending(self) -> list[int]:
        """Shards not written yet, or written with failed rows to retry."""
        return [i for i in range(self.shard_count) if i not in self.finished or self.failures.get(i)]

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
        atomic_write_json(
            self.path,
            {
                "fingerprint": self.fingerprint,
                "shards": self.shard_count,
                "finished": sorted(self.finished),
                "failures": {str(k): v for k, v in sorted(self.failures.items())},
                "usage": asdict(self.usage),
                "seconds": round(self.seconds, 3),
                "recovered": self.recovered,
            },
        )


@dataclass
class ShardedJob(Generic[Row, Result]):
    """Run `process` over the rows of every pending shard and `save` what succeeded.

    `process(generator, shard, rows, progress)` returns a result or a Failure per row, in order;
    `save(shard, pairs, keep_saved)` writes the shard's files with these (row, result) pairs, added
    to the ones already saved when `keep_saved` (a retry of failed rows), else replacing whatever a
    killed run may have left; `saved_keys(shard)` are the keys already in the shard's files.
    """

    directory: Path
    fingerprint: str
    shards: Sequence[Sequence[Row]]
    key: Callable[[Row], RowKey]
    process: Callable[[Generator, int, Sequence[Row], ProgressCallback], list[Result | Failure]]
    save: Callable[[int, list[tuple[Row, Result]], bool], None]
    saved_keys: Callable[[int], set[RowKey]]
    open_generator: Callable[[], Generator]

    def run(self, description: str, overwrite: bool) -> ShardIndex:
        index = ShardIndex(self.directory, self.fingerprint, len(self.shards), overwrite)
        total = sum(len(shard) for shard in self.shards)
        todo = {i: self._rows_to_do(index, i) for i in index.pending()}
        if not todo:
            return index
        generator = self.open_generator()  # usage counts from zero: this run's throughput
        started = time.time()
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

            for i, rows in todo.items():
                before, shard_started = _copy(generator.usage), time.time()
                results = self.process(generator, i, rows, advance)
                done = [(row, r) for row, r in zip(rows, results, strict=True) if not isinstance(r, Failure)]
                failed = [
                    {"problem_id": key[0], "sample_idx": key[1], "error": r.error, "attempts": r.attempts}
                    for key, r in zip(map(self.key, rows), results, strict=True)
                    if isinstance(r, Failure)
                ]
                retry = i in index.finished  # only its failed rows were asked again
                self.save(i, done, retry)
                index.record(
                    i,
                    failed,
                    _difference(generator.usage, before),
                    time.time() - shard_started,
                    recovered=len(done) if retry else 0,
                )
        generator.close()
        return index

    def _rows_to_do(self, index: ShardIndex, shard: int) -> list[Row]:
        rows = self.shards[shard]
        if shard not in index.finished:
            return list(rows)
        saved = self.saved_keys(shard)
        failed = {(f["problem_id"], f["sample_idx"]) for f in index.failures[shard]}
        return [row for row in rows if self.key(row) in failed and self.key(row) not in saved]


def _copy(usage: Usage) -> Usage:
    return Usage(**asdict(usage))


def _difference(after: Usage, before: Usage) -> Usage:
    return Usage(**{name: value - getattr(before, name) for name, value in asdict(after).items()})


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


def shard_seed(seed: int, shard: int) -> int:
    return int(fingerprint([seed, shard]), 16) % 2**31
