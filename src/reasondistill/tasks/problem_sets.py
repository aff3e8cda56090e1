"""Problem sets from outside the testbed: a local file, a Hub dataset, or a known set's train split.

A set's rows become `Problem`s the way a benchmark's do (a malformed row is an error naming the file,
the row and the field), with what a training set needs besides: which fields hold the question,
answer, worked solution, id, difficulty and system prompt; an answer extracted from a worked
solution where the set has no answer field (the last `\\boxed{}`, or GSM8K's `#### N`); the prompt
template; a grader; a limit; a seeded train/test split; stable ids (the source's, else a hash of the
question). `ProblemSetSpec` is the recipe's and the command line's schema; `load_problem_set` reads.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..errors import UserError
from ..records import Message, Problem, file_sha256
from ..verify.graders import GRADER_SPECS, grader_from_spec
from .benchmarks import BOXED, FILE_READERS, Benchmark, Row
from .catalog import BENCHMARKS

SetFormat = Literal["jsonl", "json", "csv", "parquet"]
AnswerFrom = Literal["field", "last-boxed", "hash-mark"]
DEFAULT_TEMPLATE = f"{{question}}\n\n{BOXED}"
DEFAULT_GRADER = "math-verify:latex"
# Field names tried, in order, where a set does not name its own.
DEFAULT_FIELDS = {
    "question": ("question", "problem", "prompt"),
    "answer": ("answer",),
    "solution": ("solution",),
}


class SetFields(BaseModel):
    """Which field of a row holds what (unset: the usual names, see DEFAULT_FIELDS)."""

    model_config = ConfigDict(extra="forbid")

    question: str | None = Field(None, description="the problem text (default: question, problem or prompt)")
    answer: str | None = Field(
        None, description="the final answer, or the text to extract it from (default: answer)"
    )
    solution: str | None = Field(
        None, description="a worked solution, kept with the problem (default: solution)"
    )
    id: str | None = Field(None, description="a unique id (default: none; ids hash the question)")
    difficulty: str | None = Field(None, description='a level: an integer, or text holding one ("Level 3")')
    system: str | None = Field(None, description="a system prompt per row")


class ProblemSetSpec(BaseModel):
    """One problem set of the `problems` stage: where it comes from and how its rows read."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="the set's name: its folder under problems/ and its task name in every later stage",
    )
    preset: str | None = Field(
        None,
        description="a known set whose source, fields, answer extraction and grader it takes (see PRESETS)",
    )
    benchmark: str | None = Field(
        None,
        description="a benchmark whose train split this set is, read as the benchmark reads its rows (its "
        "prompt, answer and grader; e.g. logiglue-folio); file: reads a local copy in its format",
    )
    file: str | None = Field(
        None, description="a local file: JSONL, JSON (an array of objects), CSV or parquet"
    )
    format: SetFormat | None = Field(None, description="the file's format (default: from its suffix)")
    hub: str | None = Field(None, description="a Hub dataset id (or a datasets builder such as json)")
    config: str | None = Field(None, description="the Hub dataset's configuration")
    split: str = Field("train", description="the Hub dataset's split")
    revision: str | None = Field(None, description="the Hub dataset's revision (a commit, to pin it)")
    data_files: list[str] | None = Field(None, description="data_files passed to datasets.load_dataset")
    fields: SetFields = Field(default_factory=SetFields, description="which field holds what")
    answer_from: AnswerFrom = Field(
        "field",
        description="field: the answer field as it is; last-boxed: the last \\boxed{} of the answer field, else "
        "of the solution; hash-mark: what follows the last '####' (GSM8K)",
    )
    template: str = Field(
        DEFAULT_TEMPLATE, description="the user message; {question} stands for the question"
    )
    system_prompt: str | None = Field(None, description="a system prompt for every problem")
    grader: str = Field(DEFAULT_GRADER, description=f"the set's grader: {', '.join(GRADER_SPECS)}")
    limit: int | None = Field(
        None, ge=1, description="at most this many problems (the first, in source order)"
    )
    test_fraction: float = Field(0.0, ge=0, lt=1, description="share of problems held out as the test split")
    seed: int = Field(0, description="seed of the train/test split")
    bad_answer: Literal["fail", "drop"] = Field(
        "fail", description="a row whose answer cannot be read: fail, or drop it (counted)"
    )

    @model_validator(mode="before")
    @classmethod
    def _preset_defaults(cls, data: Any) -> Any:
        """A preset (or a benchmark) fills what the set does not give; a `file` replaces its Hub
        source (a local copy)."""
        if not isinstance(data, dict) or (data.get("preset") is None and data.get("benchmark") is None):
            return data
        if data.get("benchmark") is not None:
            if data.get("preset") is not None:
                raise ValueError("give a preset or a benchmark, not both")
            return {**_benchmark_source(data), **data}
        preset = PRESETS.get(data["preset"])
        if preset is None:
            raise ValueError(f"unknown preset {data['preset']!r}; known: {', '.join(PRESETS)}")
        merged = {**preset, **data}
        if "file" in data:
            for key in ("hub", "config", "split", "revision"):
                if key not in data:
                    merged.pop(key, None)
        fields = data.get("fields") or {}
        if isinstance(fields, BaseModel):
            fields = fields.model_dump(exclude_unset=True)
        merged["fields"] = {**preset.get("fields", {}), **fields}
        return merged

    @model_validator(mode="after")
    def _one_source(self) -> ProblemSetSpec:
        if (self.file is None) == (self.hub is None):
            raise ValueError(f"problem set {self.name}: give one source, file or hub (or a preset)")
        if self.benchmark is not None:
            own = {"fields", "answer_from", "template"} & self.model_fields_set
            if own:
                raise ValueError(
                    f"problem set {self.name}: {sorted(own)[0]} does not apply to a benchmark's split "
                    f"(its rows are read as {self.benchmark} reads them)"
                )
        if self.format is not None and self.file is None:
            raise ValueError(f"problem set {self.name}: format applies to a file")
        if "{question}" not in self.template:
            raise ValueError(f"problem set {self.name}: template must hold {{question}}")
        grader_from_spec(self.grader)
        return self

    @property
    def difficulty_label(self) -> str | None:
        """What the set's difficulty counts: its level field, or its benchmark's label."""
        if self.benchmark is not None:
            return BENCHMARKS[self.benchmark].difficulty_label
        return self.fields.difficulty


def _benchmark_source(data: dict) -> dict[str, Any]:
    """A benchmark's train split as a set's defaults: its Hub id, configuration, split and grader."""
    benchmark = BENCHMARKS.get(data["benchmark"])
    if benchmark is None:
        raise ValueError(f"unknown benchmark {data['benchmark']!r}; `reasondistill benchmarks` lists them")
    if benchmark.grader.spec is None:
        raise ValueError(f"benchmark {benchmark.name}: its grader has no spec to give a problem set")
    defaults: dict[str, Any] = {"grader": benchmark.grader.spec}
    if "file" not in data:
        if benchmark.train_split is None or benchmark.source.startswith("https://"):
            raise ValueError(
                f"benchmark {benchmark.name} has no Hub train split; give a local file of training rows in "
                "its format (file:)"
            )
        defaults.update(hub=benchmark.source, config=benchmark.hub_config, split=benchmark.train_split)
    return defaults


# Known sets by their usual Hub ids. `file:` reads a local copy in the same format instead.
PRESETS: dict[str, dict[str, Any]] = {
    "gsm8k": {
        "hub": "openai/gsm8k",
        "config": "main",
        "split": "train",
        "fields": {"question": "question", "answer": "answer", "solution": "answer"},
        "answer_from": "hash-mark",
        "grader": "numeric",
    },
    "math": {
        "hub": "DigitalLearningGmbH/MATH-lighteval",
        "config": "default",
        "split": "train",
        "fields": {"question": "problem", "solution": "solution", "difficulty": "level"},
        "answer_from": "last-boxed",
    },
    "numinamath": {
        "hub": "AI-MO/NuminaMath-CoT",
        "split": "train",
        "fields": {"question": "problem", "solution": "solution"},
        "answer_from": "last-boxed",
    },
    "openr1-math": {
        "hub": "open-r1/OpenR1-Math-220k",
        "config": "default",
        "split": "train",
        "fields": {"question": "problem", "answer": "answer", "solution": "solution", "id": "uuid"},
    },
}


@dataclass(frozen=True)
class SetInfo:
    """What later stages need to know of a run's problem set: its grader and what its levels count."""

    grader: str
    difficulty_label: str | None = None


@dataclass
class LoadedSet:
    """A set's problems by split, where they came from, and what was left out."""

    train: list[Problem]
    test: list[Problem]
    source: dict[str, Any]
    dropped: dict[str, Any] = field(default_factory=dict)


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (nested braces balanced), or None.

    Written here rather than taken from math-verify: its parser returns sympy objects, and a gold answer
    is kept as the set's own LaTeX text."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 0, start + len("\\boxed{")
    for i in range(begin, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            if depth == 0:
                return text[begin:i].strip() or None
            depth -= 1
    return None


def after_hash_mark(text: str) -> str | None:
    """What follows the last `####` (GSM8K's gold answers), without thousands separators."""
    if "####" not in text:
        return None
    return text.rsplit("####", 1)[1].strip().replace(",", "") or None


EXTRACTORS = {"last-boxed": last_boxed, "hash-mark": after_hash_mark}


def set_file_sha256(spec: ProblemSetSpec) -> str:
    """The sha256 of a file set's file (what makes an edited file a changed input)."""
    path = Path(spec.file).expanduser()
    if not path.is_file():
        raise UserError(f"problem set {spec.name}: file {path} not found")
    return file_sha256(path)


def load_problem_set(spec: ProblemSetSpec, file_digest: str | None = None) -> LoadedSet:
    """Every problem of the set (up to its limit), split into train and test, with its source record.
    `file_digest`: the file's sha256 where the caller has it already (large sets are hashed once)."""
    benchmark = BENCHMARKS[spec.benchmark] if spec.benchmark is not None else None
    if spec.file is not None:
        rows, source = _file_rows(spec, file_digest, default_format=benchmark and benchmark.file_format)
    else:
        rows, source = _hub_rows(spec)
    if benchmark is not None:
        problems, dropped = _benchmark_problems(spec, benchmark, rows), []
        source["benchmark"] = benchmark.name
    else:
        problems, dropped = _set_problems(spec, rows)
    if not problems:
        raise UserError(f"problem set {spec.name}: {_describe(source)} holds no problems")
    train, test = _split(problems, spec.test_fraction, spec.seed)
    report = {"bad_answer": len(dropped), "first": dropped[:3]} if dropped else {}
    return LoadedSet(train, test, source, report)


def _set_problems(spec: ProblemSetSpec, rows) -> tuple[list[Problem], list[str]]:
    """The rows read through the set's field mapping, and where the rows without an answer were."""
    problems, where_of, dropped = [], {}, []
    for index, (where, data) in enumerate(rows):
        if spec.limit is not None and len(problems) >= spec.limit:
            break
        problem = _problem(spec, _SetRow(spec.name, data, where), index)
        if problem is None:
            dropped.append(where)
            continue
        if problem.id in where_of:
            raise UserError(
                f"{where}: problem set {spec.name}: id {problem.id!r} already at {where_of[problem.id]} "
                f"({'field ' + repr(spec.fields.id) if spec.fields.id else 'the same question text'})"
            )
        where_of[problem.id] = where
        problems.append(problem)
    return problems, dropped


def _benchmark_problems(spec: ProblemSetSpec, benchmark: Benchmark, rows) -> list[Problem]:
    """A benchmark's training rows, read as the benchmark reads its test rows."""
    problems = benchmark.problems(rows, spec.name, spec.limit)
    if spec.system_prompt:
        system = Message(role="system", content=spec.system_prompt)
        problems = [p.model_copy(update={"messages": [system, *p.messages]}) for p in problems]
    return problems


def _split(problems: list[Problem], fraction: float, seed: int) -> tuple[list[Problem], list[Problem]]:
    """A seeded test share; each split keeps source order."""
    held = set(random.Random(seed).sample(range(len(problems)), round(len(problems) * fraction)))
    return (
        [p for i, p in enumerate(problems) if i not in held],
        [p for i, p in enumerate(problems) if i in held],
    )


class _SetRow(Row):
    """A benchmark `Row` whose errors also name the set, and list the fields a row has when one is missing."""

    def __init__(self, set_name: str, data: Any, where: str):
        super().__init__(data, f"{where}: problem set {set_name}")

    def value(self, role: str, named: str | None, *, required: bool) -> str | None:
        """The field `named` (else the usual names of `role`) as text; a named field must be there."""
        names = (named,) if named else DEFAULT_FIELDS.get(role, ())
        value = self.get(*names, kind=(str, int, float), required=False)
        if value is None and (required or named):
            raise UserError(
                f"{self.where}: no field {' / '.join(map(repr, names))} ({role}); "
                f"the row has: {', '.join(map(str, self.data)) or 'no fields'}"
            )
        return None if value is None else str(value)


def _problem(spec: ProblemSetSpec, row: _SetRow, index: int) -> Problem | None:
    fields = spec.fields
    question = row.value("question", fields.question, required=True)
    solution = row.value("solution", fields.solution, required=False)
    if spec.answer_from == "field":
        answer = row.value("answer", fields.answer, required=True)
    else:
        text = row.value("answer", fields.answer, required=False) or solution
        if text is None:
            raise UserError(
                f"{row.where}: answer_from {spec.answer_from} needs an answer or solution field; "
                f"the row has: {', '.join(map(str, row.data))}"
            )
        answer = EXTRACTORS[spec.answer_from](text)
    if not answer or not answer.strip():
        if spec.bad_answer == "drop":
            return None
        how = "empty" if spec.answer_from == "field" else f"no answer by {spec.answer_from}"
        raise UserError(f"{row.where}: {how} (bad_answer: drop leaves such rows out, counted)")
    native = row.value("id", fields.id, required=False)
    ident = native if native is not None else hashlib.sha256(question.encode()).hexdigest()[:12]
    system = spec.system_prompt or row.value("system", fields.system, required=False)
    messages = [Message(role="system", content=system)] if system else []
    messages.append(Message(role="user", content=spec.template.replace("{question}", question)))
    return Problem(
        id=f"{spec.name}-{ident}",
        task=spec.name,
        messages=messages,
        answer=answer.strip(),
        solution=solution,
        difficulty=_level(row.value("difficulty", fields.difficulty, required=False)),
        meta=json.dumps({"row": index}),
    )


def _level(value: str | None) -> int | None:
    """An integer level from "3", "3.0" or "Level 3"; None where there is none ("Level ?")."""
    if value is None:
        return None
    found = re.search(r"-?\d+", value)
    return int(found.group()) if found else None


# ---- sources -----------------------------------------------------------------------------------


def _file_rows(
    spec: ProblemSetSpec, digest: str | None, default_format: str | None = None
) -> tuple[Iterator[tuple[str, Any]], dict[str, Any]]:
    path = Path(spec.file).expanduser()
    digest = digest or set_file_sha256(spec)
    suffix = path.suffix.lstrip(".").lower()
    file_format = spec.format or default_format or suffix
    if file_format not in (*FILE_READERS, "parquet"):
        raise UserError(
            f"problem set {spec.name}: {path}: cannot tell the format from the suffix {path.suffix!r}; "
            "set format: jsonl, json, csv or parquet"
        )
    reader = _parquet_rows if file_format == "parquet" else FILE_READERS[file_format]
    source = {"file": str(path.resolve()), "format": file_format, "sha256": digest}
    return reader(path), source


def _parquet_rows(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for a damaged file
        raise UserError(f"{path}: not a readable parquet file ({err})") from None
    for number, row in enumerate(table.to_pylist(), start=1):
        yield f"{path} row {number}", row


def _hub_rows(spec: ProblemSetSpec) -> tuple[Iterator[tuple[str, Any]], dict[str, Any]]:
    import datasets

    try:
        dataset = datasets.load_dataset(
            spec.hub, spec.config, split=spec.split, revision=spec.revision, data_files=spec.data_files
        )
    except (OSError, ValueError, ConnectionError) as err:  # offline, a missing id or data file
        raise UserError(
            f"problem set {spec.name}: could not load {spec.hub} ({type(err).__name__}: {str(err)[:200]}); "
            "offline, give a local copy as file:"
        ) from None
    source = {
        "hub": spec.hub,
        "config": spec.config,
        "split": spec.split,
        "revision": spec.revision,  # None: whatever the Hub held that day (the fingerprint tells copies apart)
        "fingerprint": dataset._fingerprint,
    }
    if spec.data_files:
        source["data_files"] = {
            str(Path(f).resolve()): file_sha256(Path(f)) for f in spec.data_files if Path(f).is_file()
        }
    where = f"{spec.hub} {spec.split}"
    return ((f"{where} row {i + 1}", row) for i, row in enumerate(dataset)), source


def _describe(source: dict[str, Any]) -> str:
    return source.get("file") or f"{source['hub']} {source['split']}"
