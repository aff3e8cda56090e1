"""The records every stage exchanges, and their parquet / JSONL storage.

One row per record; the columns are the pydantic fields below. Rows are validated when read, so a
malformed row fails with `<file> row <i>: <field>: <what was expected>` instead of deep inside a stage.
Writes are atomic: the file appears complete under its final name or not at all.
"""

from __future__ import annotations

import hashlib
import json
import os
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Literal, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import UserError, describe_validation_error

Label = Literal["correct", "incorrect", "unparseable"]
FinishReason = Literal["stop", "length"]


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Message(Record):
    role: Literal["system", "user", "assistant"]
    content: str


class Problem(Record):
    id: str
    task: str
    messages: list[Message]
    answer: str
    solution: str | None = None
    difficulty: int | None = None
    meta: str = "{}"  # a JSON object as text, so that all tasks share one parquet schema


class Trace(Record):
    problem_id: str
    task: str
    sample_idx: int
    source: str  # JSON: model, backend, sampling parameters and their hash
    completion: str
    reasoning: str | None  # text inside <think>…</think>; None when the completion has no reasoning block
    final: str  # text after the reasoning block: where the answer is graded
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason


class GradedTrace(Trace):
    label: Label
    extracted: str | None
    grader: str  # grader id: name@version+config-hash


class TrainingExample(Record):
    """One SFT example: the chat prompt and the assistant completion the loss is computed on."""

    problem_id: str
    task: str
    messages: list[Message]
    completion: str
    sample_idx: int | None = None  # the trace it came from, to find its teacher log-probabilities


class PairExample(Record):
    """A correct (chosen) and an incorrect (rejected) completion of one prompt, for DPO, REDI, AFT."""

    problem_id: str
    task: str
    messages: list[Message]
    chosen: str
    rejected: str


RecordT = TypeVar("RecordT", bound=Record)

_SCALARS = {str: pa.string(), int: pa.int64(), float: pa.float64(), bool: pa.bool_()}


def _arrow_type(annotation) -> pa.DataType:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return _SCALARS[type(typing.get_args(annotation)[0])]
    if origin in (typing.Union, types.UnionType):
        (inner,) = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return _arrow_type(inner)
    if origin is list:
        return pa.list_(_arrow_type(typing.get_args(annotation)[0]))
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return pa.struct([(name, _arrow_type(f.annotation)) for name, f in annotation.model_fields.items()])
    return _SCALARS[annotation]


def arrow_schema(record_type: type[Record]) -> pa.Schema:
    """A fixed parquet schema per record type, so shards written at different times always concatenate."""
    return pa.schema([(name, _arrow_type(f.annotation)) for name, f in record_type.model_fields.items()])


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


def write_records(path: Path, records: Iterable[Record], record_type: type[Record]) -> int:
    """Write records as one parquet file, atomically; returns the number of rows."""
    rows = [r.model_dump() for r in records]
    table = pa.Table.from_pylist(rows, schema=arrow_schema(record_type))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    return len(rows)


def expected_columns(record_type: type[Record]) -> str:
    """`problem_id, task, messages, completion (sample_idx optional)`, for messages about wrong columns."""
    fields = record_type.model_fields
    required = [name for name, f in fields.items() if f.is_required()]
    optional = [name for name, f in fields.items() if not f.is_required()]
    return ", ".join(required) + (f" ({', '.join(optional)} optional)" if optional else "")


def _check_columns(where: str, row: dict, record_type: type[Record]) -> None:
    fields = record_type.model_fields
    unknown = [key for key in row if key not in fields]
    missing = [name for name, f in fields.items() if f.is_required() and name not in row]
    if unknown or missing:
        found = "; ".join(
            part
            for part in (
                f"unknown column{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}" if unknown else "",
                f"missing {', '.join(missing)}" if missing else "",
            )
            if part
        )
        raise UserError(f"{where}: {found}; expected columns: {expected_columns(record_type)}")


def _validate_rows(located_rows: Iterable[tuple[str, dict]], record_type: type[RecordT]) -> list[RecordT]:
    records = []
    for where, row in located_rows:
        _check_columns(where, row, record_type)
        try:
            records.append(record_type.model_validate(row))
        except ValidationError as err:
            raise UserError(describe_validation_error(err, where)) from None
    return records


def read_records(path: Path, record_type: type[RecordT]) -> list[RecordT]:
    """Read and validate a parquet file, or a JSON Lines file (`.jsonl`) of the same columns."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: file not found")
    if path.suffix == ".jsonl":
        return _validate_rows(read_jsonl_rows(path), record_type)
    try:
        rows = pq.read_table(path).to_pylist()
    except (pa.ArrowInvalid, OSError) as err:
        raise UserError(f"{path}: not a readable parquet file ({err})") from None
    return _validate_rows(((f"{path} row {i}", row) for i, row in enumerate(rows)), record_type)


def decode_utf8(data: bytes, where: str, first_line: int = 1) -> str:
    """`data` as UTF-8 text; UserError naming `where`, the line and the column of the first bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + first_line
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise UserError(
            f"{where} line {line}: not valid UTF-8 (byte 0x{data[err.start]:02x} at column {column})"
        ) from None


def read_text_utf8(path: Path) -> str:
    """A text file's content; invalid UTF-8 is a UserError naming the file, line and column."""
    return decode_utf8(Path(path).read_bytes(), str(path))


def read_jsonl_rows(path: Path) -> Iterable[tuple[str, dict]]:
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            line = decode_utf8(raw, str(path), first_line=number)
            if not line.strip():
                continue
            where = f"{path} line {number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{where}: invalid JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(row, dict):
                raise UserError(f"{where}: expected a JSON object, got {type(row).__name__}")
            yield where, row


def file_sha256(path: Path) -> str:
    """The sha256 of a file, read in blocks (sets can be large); a missing file is an error."""
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
