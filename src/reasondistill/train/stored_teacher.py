"""A stored teacher's top-k distributions laid out on the training examples, without holding the
store in memory.

A score or generate step keeps the teacher's top-k log-probabilities of every trace in compressed
parquet files. A training run needs, for each example, the rows of its completion tokens; decoded
they take 6k + 4 bytes per token (k = 20 over 400 M tokens of traces: 50 GB), too much to hold in
every process of a job. So:

1. `write_teacher_rows` reads the store one file at a time, checks every trace the examples use
   against the student's tokens, and appends its completion rows to one uncompressed Arrow IPC file
   (process 0 alone, in a job of several);
2. `TeacherRows` memory-maps that file in every process: `rows[i]` is example i's
   `SparseTeacherRows`, copied out of the map when its batch is collated.

What is read stays in the page cache, shared by the processes; a process's memory grows with its
batch, not with the store.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from ..errors import UserError
from ..generate.logprobs import TokenLogprobs, read_logprobs
from ..records import TrainingExample
from .data import SparseTeacherRows, TokenizedExample

StoredRow = tuple[str, int, TokenLogprobs]  # (problem_id, sample_idx, distribution)


@dataclass(frozen=True)
class StoredTeacher:
    """Stored teacher distributions, read a part (a file) at a time by `parts()`."""

    source: str  # where they are, for messages
    parts: Callable[[], Iterable[Sequence[StoredRow]]]

    @staticmethod
    def from_files(paths: Sequence[Path], source: str) -> StoredTeacher:
        """The logprobs files of a score or generate step (`write_logprobs`)."""
        return StoredTeacher(source, lambda: map(read_logprobs, paths))

    @staticmethod
    def from_rows(rows: Mapping[tuple[str, int], TokenLogprobs], source: str) -> StoredTeacher:
        """Distributions already in memory, by (problem_id, sample_idx)."""
        return StoredTeacher(source, lambda: [[(p, s, d) for (p, s), d in rows.items()]])


_SCHEMA = pa.schema(
    [
        ("example", pa.int32()),  # the example's position in the training data
        ("start", pa.int32()),  # its first completion token (its prompt's length)
        ("topk_ids", pa.large_list(pa.int32())),  # [n, k] row-major, n completion tokens
        ("topk_logprobs", pa.large_list(pa.float16())),  # [n, k]
        ("tail_logprob", pa.large_list(pa.float16())),  # [n]
        ("token_logprob", pa.large_list(pa.float16())),  # [n]: log p_T of the completion's own token
    ]
)


def write_teacher_rows(
    examples: Sequence[TrainingExample],
    tokenized: Sequence[TokenizedExample],
    stored: StoredTeacher,
    path: Path,
) -> None:
    """Align the stored distributions with the student's tokens, refusing any mismatch, and write
    each example's completion rows to `path` (Arrow IPC, atomically; `<path>.json` beside it says k
    and the largest token id).

    A trace's `token_ids` are the completion tokens the teacher was scored on; they must be the
    student's completion tokens exactly, or teacher and student would disagree about which token each
    row describes. The store is read one part at a time; of several failures, the one of the earliest
    example is reported, with how many there are. A trace stored twice is taken from its first part.
    """
    wanted: dict[tuple[str, int], list[int]] = {}
    for i, example in enumerate(examples):
        if example.sample_idx is not None:
            wanted.setdefault((example.problem_id, example.sample_idx), []).append(i)
    failures: dict[int, str] = {}  # by example
    k, max_id, written = None, 0, set()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, _SCHEMA) as writer:
            for part in stored.parts():
                columns: dict[str, list] = {name: [] for name in _SCHEMA.names}
                for problem_id, sample_idx, distribution in part:
                    for i in wanted.pop((problem_id, sample_idx), ()):
                        start, completion = _completion(tokenized[i])
                        problem = _mismatch(distribution, completion, tokenized[i].truncated, k)
                        if problem:
                            failures[i] = problem
                            continue
                        k = distribution.k
                        rows = slice(0, len(completion))
                        max_id = max(max_id, int(distribution.topk_ids[rows].max(initial=0)))
                        for name, values in (
                            ("example", i),
                            ("start", start),
                            ("topk_ids", distribution.topk_ids[rows].ravel()),
                            ("topk_logprobs", distribution.topk_logprobs[rows].ravel()),
                            ("tail_logprob", distribution.tail_logprob[rows]),
                            ("token_logprob", distribution.logprobs[rows]),
                        ):
                            columns[name].append(values)
                        written.add(i)
                if columns["example"]:
                    writer.write_batch(_record_batch(columns))
        pa.default_memory_pool().release_unused()  # the parts' buffers go back to the system, not to training
        failures |= {
            i: "no stored teacher log-probabilities for this training example"
            for i in range(len(examples))
            if i not in written and i not in failures
        }
        if failures:
            first = min(failures)
            example = examples[first]
            others = (
                f" ({len(failures) - 1} more of the {len(examples)} examples fail too)"
                if len(failures) > 1
                else ""
            )
            raise UserError(
                f"{stored.source}: problem {example.problem_id!r} sample {example.sample_idx}: {failures[first]}{others}"
            )
        _facts_path(path).write_text(json.dumps({"k": k, "max_id": max_id, "examples": len(examples)}))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _completion(tokens: TokenizedExample) -> tuple[int, np.ndarray]:
    start = tokens.prompt_length
    return start, tokens.input_ids[start:]


def _mismatch(stored: TokenLogprobs, completion: np.ndarray, truncated: bool, k: int | None) -> str | None:
    """Why a stored trace cannot teach this completion (None if it can); `k` that of the traces so far."""
    if not np.array_equal(stored.token_ids[: len(completion)], completion) or (
        not truncated and len(stored) != len(completion)
    ):
        return (
            "the stored token ids differ from the student's tokenization of the completion "
            "(training data other than the scored traces, another tokenizer or chat template, or traces "
            "changed since scoring)"
        )
    if stored.k == 0:
        return "stored with k=0; expected top-k log-probabilities (generate --top-logprobs K, or score)"
    if k is not None and stored.k != k:
        return f"stored with k={stored.k}; expected k={k} like the other rows"
    return None


def _record_batch(columns: dict[str, list]) -> pa.RecordBatch:
    arrays = []
    for field in _SCHEMA:
        values = columns[field.name]
        if pa.types.is_large_list(field.type):  # 64-bit offsets: a part may hold over 2^31 values
            dtype = field.type.value_type.to_pandas_dtype()
            offsets = np.cumsum([0] + [len(v) for v in values], dtype=np.int64)
            flat = np.concatenate(values).astype(dtype, copy=False)
            arrays.append(
                pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(flat, field.type.value_type))
            )
        else:
            arrays.append(pa.array(values, field.type))
    return pa.RecordBatch.from_arrays(arrays, schema=_SCHEMA)


def _facts_path(path: Path) -> Path:
    return path.with_name(f"{path.name}.json")


class TeacherRows(Sequence[SparseTeacherRows]):
    """The file of `write_teacher_rows`, memory-mapped: `rows[i]` is example i's `SparseTeacherRows`
    (zero rows on its prompt, the stored rows on its completion)."""

    def __init__(self, path: Path):
        self.path = path
        facts = json.loads(_facts_path(path).read_text())
        self.k, self.max_id = facts["k"], facts["max_id"]
        reader = pa.ipc.open_file(pa.memory_map(str(path)))
        self._batches = [reader.get_batch(b) for b in range(reader.num_record_batches)]
        self._where = np.full((facts["examples"], 2), -1, dtype=np.int64)  # example → (batch, row)
        for b, batch in enumerate(self._batches):
            examples = batch.column("example").to_numpy()
            self._where[examples] = np.stack([np.full(len(examples), b), np.arange(len(examples))], axis=1)

    def __len__(self) -> int:
        return len(self._where)

    def __getitem__(self, i: int) -> SparseTeacherRows:
        b, row = self._where[i]
        batch = self._batches[b]

        def values(name: str) -> np.ndarray:
            return batch.column(name)[row].values.to_numpy(zero_copy_only=True)

        return SparseTeacherRows.placed(
            batch.column("start")[row].as_py(),
            values("topk_ids").reshape(-1, self.k),
            values("topk_logprobs").reshape(-1, self.k),
            values("tail_logprob"),
            values("token_logprob"),
        )

    def __reduce__(self):  # a DataLoader worker started by spawn maps the file again
        return TeacherRows, (self.path,)
