"""Public benchmarks: where each is published, how its rows become problems, and which grader grades it.

A benchmark loads from its usual Hub dataset, or, where no Hub copy has the upstream format, from
the upstream file at a pinned commit; `data_file` reads a local copy instead, in the format of the
files described in shared/data/benchmarks/SOURCES.md. Every row becomes a `Problem` whose prompt
asks for step-by-step reasoning and a final answer the benchmark's grader reads; a malformed row
is an error naming the file, the row and the field, never a skipped problem.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..errors import UserError
from ..records import Message, Problem, read_jsonl_rows, read_text_utf8
from ..verify.graders import ChoiceGrader, ExactStringGrader, Grader, LabelGrader, MathGrader, NumericGrader

FileFormat = Literal["jsonl", "json", "csv", "logiqa-txt"]
BOXED = "Please reason step by step, and put your final answer within \\boxed{}."


class Row:
    """One source row, with field access that fails with the row's location and the expected type."""

    def __init__(self, data: Any, where: str):
        if not isinstance(data, dict):
            raise UserError(f"{where}: expected an object with named fields, got {type(data).__name__}")
        self.data, self.where = data, where

    def get(self, *names: str, kind: type | tuple[type, ...] = str, required: bool = True):
        """The first present field of `names` (Hub copies sometimes rename one), checked to be `kind`."""
        for name in names:
            if self.data.get(name) is not None:
                value = self.data[name]
                if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
                    expected = (
                        kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
                    )
                    raise UserError(f"{self.where}: field {name!r}: expected {expected}, got {value!r:.60}")
                return value
        if required:
            raise UserError(f"{self.where}: missing field {' / '.join(map(repr, names))}")
        return None

    def fail(self, field: str, expected: str) -> UserError:
        return UserError(
            f"{self.where}: field {field!r}: expected {expected}, got {self.data.get(field)!r:.60}"
        )


@dataclass(frozen=True)
class Item:
    """What a benchmark reads from one row; the benchmark turns it into a `Problem`."""

    native_id: str
    question: str  # the benchmark's own text; the prompt adds the benchmark's instruction
    answer: str
    solution: str | None = None
    difficulty: int | None = None
    meta: dict | None = None


@dataclass(frozen=True)
class Benchmark:
    name: str
    description: str
    source: str  # a Hub dataset id, or an https URL of the upstream file at a pinned commit
    split: str  # the Hub split (ignored for URL sources)
    file_format: FileFormat  # of the upstream file and of a local copy
    read: Callable[[Row, int], Item]
    grader: Grader
    instruction: str = BOXED  # appended to every question: how to reason and where to put the answer
    hub_config: str | None = None
    difficulty_label: str | None = None  # what `Problem.difficulty` means here ("MATH level")
    train_split: str | None = None  # the Hub split to train on, where the benchmark has one
    tags: Mapping[str, str] = field(default_factory=dict)  # a suite's groups: {"suite", "reasoning", …}

    def load(self, data_file: str | Path | None = None, limit: int | None = None) -> list[Problem]:
        """The benchmark's problems in source order (the first `limit` with a limit)."""
        rows = self._local_rows(Path(data_file).expanduser()) if data_file else self._remote_rows()
        problems = self.problems(rows, self.name, limit)
        if not problems:
            raise UserError(f"benchmark {self.name}: {data_file or self.source} holds no problems")
        return problems

    def problems(self, rows, task: str, limit: int | None = None) -> list[Problem]:
        """`rows` ((where, data) pairs in the benchmark's format) as problems of `task`, ids unique."""
        problems: dict[str, Problem] = {}
        for index, (where, data) in enumerate(rows):
            if limit is not None and len(problems) >= limit:
                break
            item = self.read(Row(data, where), index)
            problem = Problem(
                id=f"{task}-{item.native_id}",
                task=task,
                messages=[Message(role="user", content=f"{item.question}\n\n{self.instruction}")],
                answer=item.answer,
                solution=item.solution,
                difficulty=item.difficulty,
                meta=json.dumps(item.meta or {}, sort_keys=True),
            )
            if problem.id in problems:
                raise UserError(f"{where}: problem id {item.native_id!r} appears twice in {task}")
            problems[problem.id] = problem
        return list(problems.values())

    def question(self, problem: Problem) -> str:
        """The benchmark's own text of a problem, without the instruction the prompt adds."""
        return problem.messages[0].content.removesuffix(f"\n\n{self.instruction}")

    def _local_rows(self, path: Path) -> Iterator[tuple[str, Any]]:
        if not path.is_file():
            raise UserError(f"benchmark {self.name}: data file {path} not found")
        return FILE_READERS[self.file_format](path)

    def _remote_rows(self) -> Iterator[tuple[str, Any]]:
        import datasets
        from datasets.utils.file_utils import cached_path

        is_url = self.source.startswith("https://")
        try:
            if is_url:
                path = Path(cached_path(self.source))  # downloaded once into the datasets cache
            else:
                dataset = datasets.load_dataset(self.source, self.hub_config, split=self.split)
        except (OSError, ValueError, ConnectionError) as err:
            raise UserError(
                f"benchmark {self.name}: could not load {self.source} ({type(err).__name__}: {err}); "
                "pass --data-file with a local copy"
            ) from None
        if is_url:
            yield from FILE_READERS[self.file_format](path)
        else:
            for i, row in enumerate(dataset):
                yield f"{self.source} {self.split} row {i}", row


# ---- file formats ------------------------------------------------------------------------------


def _json_array_rows(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        rows = json.loads(read_text_utf8(path))
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: invalid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(rows, list):
        raise UserError(f"{path}: expected a JSON array of objects, got {type(rows).__name__}")
    return ((f"{path} item {i}", row) for i, row in enumerate(rows))


def _csv_rows(path: Path) -> Iterator[tuple[str, Any]]:
    reader = csv.DictReader(io.StringIO(read_text_utf8(path), newline=""))
    for row in reader:
        yield f"{path} line {reader.line_num}", row


def _logiqa_txt_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """LogiQA v1's text format, 8 lines per question: blank, gold letter a-d, context, question, and
    four options. Options are read by position: most start "A." but some "A ", "A?" or nothing."""
    lines = read_text_utf8(path).rstrip("\n").split("\n")
    for start in range(0, len(lines), 8):
        block, where = lines[start : start + 8], f"{path} line {start + 1}"
        if len(block) != 8 or block[0].strip() or block[1].strip() not in ("a", "b", "c", "d"):
            raise UserError(
                f"{where}: expected a blank line, a gold letter a-d, a context, a question and 4 options"
            )
        options = [
            line[2:].strip() if line[:1] == letter and line[1:2] in ". ?" else line.strip()
            for letter, line in zip("ABCD", block[4:], strict=True)
        ]
        yield (
            where,
            {
                "context": block[2].strip(),
                "query": block[3].strip(),
                "options": options,
                "correct_option": "abcd".index(block[1].strip()),
            },
        )


FILE_READERS: dict[FileFormat, Callable[[Path], Iterator[tuple[str, Any]]]] = {
    "jsonl": read_jsonl_rows,
    "json": _json_array_rows,
    "csv": _csv_rows,
    "logiqa-txt": _logiqa_txt_rows,
}


# ---- rows → problems ---------------------------------------------------------------------------


def _gsm8k(row: Row, index: int) -> Item:
    solution = row.get("answer")
    if "####" not in solution:
        raise row.fail("answer", "a worked solution ending in '#### <number>'")
    gold = solution.rsplit("####", 1)[1].strip().replace(",", "")
    return Item(f"{index:04d}", row.get("question"), gold, solution=solution)


def _math500(row: Row, index: int) -> Item:
    native_id = row.get("unique_id", required=False) or f"{index:03d}"
    return Item(
        native_id.removeprefix("test/").removesuffix(".json"),
        row.get("problem"),
        row.get("answer"),
        solution=row.get("solution", required=False),
        difficulty=row.get("level", kind=int, required=False),
        meta={"subject": row.get("subject", required=False)},
    )


def _competition(row: Row, index: int) -> Item:
    """AIME and AMC as Qwen2.5-Math and the usual Hub copies store them: numeric answers, possibly
    zero-padded strings ("025") or floats (27.0)."""
    answer = row.get("answer", kind=(str, int, float))
    if isinstance(answer, float):
        answer = str(int(answer)) if answer.is_integer() else repr(answer)
    native_id = row.get("id", kind=(str, int), required=False)
    return Item(
        str(index if native_id is None else native_id),
        row.get("problem", "question"),
        str(answer).strip(),
        solution=row.get("solution", required=False) or None,
        meta={"url": row.get("url", required=False)},
    )


def _label_instruction(labels: tuple[str, ...]) -> str:
    listed = ", ".join(labels[:-1]) + f", or {labels[-1]}" if len(labels) > 2 else " or ".join(labels)
    return f"Please reason step by step, and put your final answer ({listed}) within \\boxed{{}}."


FOLIO_LABELS = ("True", "False", "Uncertain")
PRONTOQA_LABELS = ("True", "False")
PROOFWRITER_LABELS = ("True", "False", "Unknown")


def _folio(row: Row, index: int) -> Item:
    premises = row.get("premises", kind=(list, str))
    premises = "\n".join(premises) if isinstance(premises, list) else premises.strip()
    label = row.get("label")
    if label not in FOLIO_LABELS:
        raise row.fail("label", " / ".join(FOLIO_LABELS))
    question = (
        f"Premises:\n{premises}\n\nBased on the premises, is the following conclusion True, False, "
        f"or Uncertain?\n{row.get('conclusion')}"
    )
    native_id = row.get("example_id", kind=(str, int), required=False)
    return Item(str(index if native_id is None else native_id), question, label)


_OPTION = re.compile(r"^\s*\(?([A-Z])[).:]\s*(.+?)\s*$")


def _logic_lm(labels: tuple[str, ...]) -> Callable[[Row, int], Item]:
    """ProntoQA and ProofWriter as Logic-LM releases them: options "A) True", a gold letter. The
    problem is posed and graded with the option's label, which is what models naturally answer."""

    def read(row: Row, index: int) -> Item:
        options = {}
        for option in row.get("options", kind=list):
            match = _OPTION.match(str(option))
            if not match or match.group(2) not in labels:
                raise row.fail("options", f"options like 'A) {labels[0]}' with labels {'/'.join(labels)}")
            options[match.group(1)] = match.group(2)
        gold = row.get("answer")
        if gold not in options:
            raise row.fail("answer", f"one of the option letters {', '.join(options)}")
        question = f"{row.get('context')}\n\n{row.get('question')}"
        return Item(row.get("id"), question, options[gold], meta={"letter": gold})

    return read


CHOICE_INSTRUCTION = "Please reason step by step, and put the letter of the correct option within \\boxed{}."


def choice_question(context: str, question: str, options: list, letters: str = "ABCD") -> str:
    """Context, question and the options lettered `A. …` (as many letters as options)."""
    lines = [f"{letter}. {text}" for letter, text in zip(letters, options, strict=False)]
    head = f"{context}\n\n{question}\n" if context else f"{question}\n"
    return head + "\n".join(lines)


def _logiqa(row: Row, index: int) -> Item:
    """LogiQA v1, from its text file (parsed above) or the lucasmccabe/logiqa Hub copy (same fields)."""
    options = row.get("options", kind=list)
    gold = row.get("correct_option", kind=int)
    if len(options) != 4 or not 0 <= gold < 4:
        raise row.fail("correct_option", "four options and a gold index 0-3")
    question = choice_question(row.get("context"), row.get("query"), options)
    return Item(f"{index:04d}", question, "ABCD"[gold])


def _logiqa2(row: Row, index: int) -> Item:
    options = row.get("options", kind=list)
    gold = row.get("answer", kind=int)
    if not 0 <= gold < len(options) <= 4:
        raise row.fail("answer", f"an option index 0-{len(options) - 1}")
    question = choice_question(row.get("text"), row.get("question"), options)
    # Upstream ids are not unique (4 ids are shared by two different questions): number by row.
    upstream_id = row.get("id", kind=(str, int), required=False)
    return Item(f"{index:04d}", question, "ABCD"[gold], meta={"upstream_id": upstream_id})


_CLUTRR_QUERY = re.compile(r"^\(\s*'([^']+)'\s*,\s*'([^']+)'\s*\)$")
_CLUTRR_HOPS = re.compile(r"^task_1\.(\d+)$")


def _clutrr(row: Row, index: int) -> Item:
    """CLUTRR/v1: `target_text` is the relation of the query's second person to its first."""
    query = _CLUTRR_QUERY.match(row.get("query").strip())
    if not query:
        raise row.fail("query", "a pair of names like ('Jason', 'Lewis')")
    first, second = query.groups()
    hops = _CLUTRR_HOPS.match(row.get("task_name", required=False) or "")
    story = row.get("story").replace("[", "").replace("]", "")  # names are bracketed in the source
    question = (
        f"{story}\n\nHow is {second} related to {first}? Answer with the kinship term X in "
        f'"{second} is {first}\'s X".'
    )
    return Item(
        row.get("id"), question, row.get("target_text"), difficulty=int(hops.group(1)) if hops else None
    )


# ---- the registry ------------------------------------------------------------------------------

_LOGIC_LM = "https://raw.githubusercontent.com/teacherpeterpan/Logic-LLM/d29f1e5e7203e8826cb9c41ba3003e43dc0b9d34/data"
_MATH_NUMBER = MathGrader(gold_format="number")

# Benchmarks that are one dataset each; suites of many (LogiGLUE) have their own modules, and
# tasks/__init__.py holds them all as BENCHMARKS.
SINGLE_BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark("gsm8k", "grade-school math word problems (test, 1,319)", "openai/gsm8k", "test",
                  "jsonl", _gsm8k, NumericGrader(), hub_config="main"),
        Benchmark("math500", "MATH-500, the 500-problem MATH test subset of PRM800K", "HuggingFaceH4/MATH-500",
                  "test", "jsonl", _math500, MathGrader(gold_format="latex"), difficulty_label="MATH level"),
        Benchmark("aime24", "AIME 2024 I and II (30)", "HuggingFaceH4/aime_2024", "train", "jsonl",
                  _competition, _MATH_NUMBER),
        Benchmark("aime25", "AIME 2025 I and II (30)", "yentinglin/aime_2025", "train", "jsonl",
                  _competition, _MATH_NUMBER),
        Benchmark("amc23", "AMC 12 2023, free-response (40)", "math-ai/amc23", "test", "jsonl",
                  _competition, _MATH_NUMBER),
        Benchmark("folio", "FOLIO first-order-logic entailment, True/False/Uncertain", "yale-nlp/FOLIO",
                  "validation", "jsonl", _folio, LabelGrader(FOLIO_LABELS),
                  instruction=_label_instruction(FOLIO_LABELS)),
        Benchmark("prontoqa", "ProntoQA 5-hop fictional ontologies, True/False (Logic-LM release)",
                  f"{_LOGIC_LM}/ProntoQA/dev.json", "dev", "json", _logic_lm(PRONTOQA_LABELS),
                  LabelGrader(PRONTOQA_LABELS), instruction=_label_instruction(PRONTOQA_LABELS)),
        Benchmark("proofwriter", "ProofWriter depth-5 open-world, True/False/Unknown (Logic-LM release)",
                  f"{_LOGIC_LM}/ProofWriter/dev.json", "dev", "json", _logic_lm(PROOFWRITER_LABELS),
                  LabelGrader(PROOFWRITER_LABELS), instruction=_label_instruction(PROOFWRITER_LABELS)),
        Benchmark("logiqa", "LogiQA v1 four-option logical reading comprehension", "lucasmccabe/logiqa",
                  "test", "logiqa-txt", _logiqa, ChoiceGrader("ABCD"), instruction=CHOICE_INSTRUCTION),
        Benchmark("logiqa2", "LogiQA 2.0 four-option logical reading comprehension", "baber/logiqa2", "test",
                  "jsonl", _logiqa2, ChoiceGrader("ABCD"), instruction=CHOICE_INSTRUCTION, hub_config="logiqa2"),
        Benchmark("clutrr", "CLUTRR kinship relations, chains of 2-10 relations", "CLUTRR/v1", "test", "csv",
                  _clutrr, ExactStringGrader(), hub_config="gen_train23_test2to10",
                  difficulty_label="relations in the chain"),
    )
}  # fmt: skip
