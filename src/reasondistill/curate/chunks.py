"""`chunk`: cut each trace's reasoning into chunks, label them reasoning / non-reasoning, and write a
Skip-Thinking STT set without the non-reasoning middle chunks.

Skip-Thinking (EMNLP 2025, arXiv 2505.18642) trains on chunks of the teacher's rationale (CWT) and
on "skipped" sequences that leave out the non-reasoning middle chunks (STT). Its chunkers, coherence
metric and non-reasoning classifier were not published; what is here is a deterministic stand-in.

Chunking (of the reasoning block only; the final answer text is never cut). Chunks are substrings
that re-join to the reasoning exactly (whitespace included: a chunk carries the whitespace after it).

- `average` (the paper's AC): `chunks` pieces of near-equal length in whitespace-separated words
  (sizes differ by at most one word, longer pieces first).
- `boundary` (a stand-in for search-based chunking, SBC): cut at the strongest boundary the text
  has: paragraphs (blank lines); a text without paragraph breaks at its line breaks; a single line
  at sentence ends (`.`, `!`, `?` followed by whitespace). A piece longer than `max_words` is cut
  again at the next weaker boundary, and a sentence still longer into `max_words`-word pieces.
  Consecutive pieces shorter than `min_words` are then joined with the next (within `max_words`).
  Units of text the author separated stay whole, so a "Wait, let me check." paragraph is a chunk
  of its own, where SBC would search for split points of greatest coherence.

Labelling with rules (`labeller: rules`), per chunk, the first rule that applies; `content words` are
the chunk's words without stop words and numbers, `new` means absent from the question and from
the earlier chunks:

1. `empty`: no word at all → non-reasoning.
2. `computation`: an equation, comparison or operation between numbers (`5 + 8 = 13`, `x > 2`,
   `\\frac`) or a number that is new → reasoning.
3. `meta`: opens with a transition or meta phrase ("okay", "wait", "first", "let me", "I need to",
   "the problem asks", "in summary", …) or has no content word, and has no inference word outside
   the meta phrases → non-reasoning.
4. `inference`: an inference word (therefore, thus, hence, so, because, since, if, then, implies,
   means, follows, must, conclude, consequently) → reasoning.
5. `restatement`: at least `restate_overlap` (0.7) of its content words occur in the question →
   non-reasoning.
6. `summary`: at least `summary_overlap` (0.8) of its content words occur in the question or the
   earlier chunks (it repeats earlier content and computes nothing new) → non-reasoning.
7. `default`: reasoning (when unsure, keep it).

With `labeller: teacher` a teacher (any backend) labels the chunks of each trace, numbered, one line
per chunk (`LABEL_SYSTEM_PROMPT`); a reply that does not give exactly one label to every chunk falls
back to the rules for that trace (counted in the stats) or, with `fallback: fail`, stops the step
naming the trace. The raw replies are kept in resumable shards in chunks/<name>.labels/.

Outputs: chunks/<name>.parquet (one row per trace: chunks, labels, the rule of each label) under
the step `chunk:<name>`, and the STT set curated/<name>.parquet (TrainingExamples: the reasoning
without its non-reasoning middle chunks, the first and last chunk and the final answer kept) under
a `curate:<name>` step, so `train` reads it like any curated set.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import Field, model_validator

from ..errors import UserError
from ..generate.backends import backend_model, backend_requirements
from ..generate.shards import usage_totals
from ..generate.stage import usage_stats
from ..records import (
    GradedTrace,
    Label,
    Message,
    Problem,
    Record,
    TrainingExample,
    read_records,
    write_records,
)
from ..rundir import RunDir
from ..stages import Stage
from ..tasks.stage import problems_by_id
from ..ui import note
from ..verify.reasoning import format_completion, split_reasoning
from .rewrite import LengthCounter, PromptRow, TeacherOptions, run_teacher_job, teacher_source, tokenizer_path
from .sets import (
    graded_fingerprint,
    graded_requirement,
    training_data,
    training_data_name,
    training_data_step,
)

ChunkLabel = Literal["reasoning", "non-reasoning"]

# --- chunking ----------------------------------------------------------------------------------------

_WORD_SPAN = re.compile(r"\S+\s*")
# Boundaries from strongest to weakest; each piece ends right after its boundary's whitespace.
_BOUNDARIES = (
    re.compile(r"\n[ \t]*\n\s*"),  # paragraphs
    re.compile(r"\n\s*"),  # lines
    re.compile(r"(?<=[.!?])[\"')\]]*\s+"),  # sentences
)


def count_words(text: str) -> int:
    return len(text.split())


def _cut(text: str, ends: Sequence[int]) -> list[str]:
    """`text` cut at the given end offsets (the last piece runs to the end of the text)."""
    pieces, start = [], 0
    for end in ends:
        if start < end < len(text):
            pieces.append(text[start:end])
            start = end
    pieces.append(text[start:])
    return pieces


def _word_ends(text: str) -> list[int]:
    return [m.end() for m in _WORD_SPAN.finditer(text)]


def average_chunks(text: str, chunks: int) -> list[str]:
    """`chunks` pieces with near-equal word counts (AC); fewer when the text has fewer words."""
    ends = _word_ends(text)
    if not ends:
        return [text] if text else []
    count = min(chunks, len(ends))
    size, extra = divmod(len(ends), count)
    cuts, taken = [], 0
    for i in range(count - 1):
        taken += size + (i < extra)
        cuts.append(ends[taken - 1])
    return _cut(text, cuts)


def _word_groups(text: str, max_words: int) -> list[str]:
    ends = _word_ends(text)
    return _cut(text, ends[max_words - 1 :: max_words])


def _segments(text: str, max_words: int, level: int = 0) -> list[str]:
    if level == len(_BOUNDARIES):
        return _word_groups(text, max_words)
    pieces = _cut(text, [m.end() for m in _BOUNDARIES[level].finditer(text)])
    if len(pieces) == 1:  # no boundary of this strength: look for the next weaker one
        return _segments(text, max_words, level + 1)
    segments = []
    for piece in pieces:
        if count_words(piece) <= max_words:
            segments.append(piece)
        else:
            segments.extend(_segments(piece, max_words, level + 1))
    return segments


def boundary_chunks(text: str, max_words: int = 64, min_words: int = 1) -> list[str]:
    """Chunks at paragraph / line / sentence boundaries of at most `max_words` words (see the module
    docstring); pieces under `min_words` words join the next one while the chunk stays within the maximum."""
    if not text:
        return []
    chunks: list[str] = []
    current, words = "", 0
    for segment in _segments(text, max_words):
        size = count_words(segment)
        if current and (words >= min_words and size > 0 or words + size > max_words):
            chunks.append(current)
            current, words = "", 0
        current, words = current + segment, words + size
    if current:
        if chunks and words < min_words and count_words(chunks[-1]) + words <= max_words:
            chunks[-1] += current
        else:
            chunks.append(current)
    return chunks


# --- rule labeller -----------------------------------------------------------------------------------

_STOP_WORDS = frozenset(
    [
        "a",
        "an",
        "the",
        "of",
        "to",
        "in",
        "on",
        "at",
        "for",
        "and",
        "or",
        "but",
        "not",
        "no",
        "is",
        "are",
        "was",
        "were",
        "be",
        "been",
        "being",
        "am",
        "it",
        "its",
        "this",
        "that",
        "these",
        "those",
        "there",
        "here",
        "i",
        "we",
        "you",
        "he",
        "she",
        "they",
        "me",
        "us",
        "my",
        "our",
        "your",
        "his",
        "her",
        "their",
        "them",
        "with",
        "as",
        "by",
        "from",
        "do",
        "does",
        "did",
        "doing",
        "has",
        "have",
        "had",
        "having",
        "will",
        "would",
        "can",
        "could",
        "should",
        "shall",
        "may",
        "might",
        "just",
        "also",
        "what",
        "which",
        "who",
        "whom",
        "how",
        "when",
        "where",
        "why",
        "all",
        "any",
        "each",
        "some",
        "one",
        "more",
        "most",
        "other",
        "such",
        "only",
        "own",
        "same",
        "than",
        "too",
        "very",
        "s",
        "t",
        "about",
        "into",
        "over",
        "under",
        "again",
        "further",
        "once",
        "up",
        "down",
        "out",
        "off",
        "then",
        "so",
        "if",
        "now",
        "let",
        "lets",
        "let's",
        "okay",
        "ok",
        "well",
        "yes",
    ]  # noqa: SIM905
)
_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_EXPRESSION = re.compile(
    r"[^\s=<>≤≥≠]*\s*[=<>≤≥≠]\s*[^\s=<>≤≥≠]+"  # an equation or comparison with its two sides
    r"|\d[\d.,]*\s*[-+*/×÷^]\s*[\d(][\d.,]*"  # an operation between numbers
    r"|\\(?:frac|sqrt|cdot|times|div|sum|prod|int)\b"  # LaTeX maths
)
_OPENER = re.compile(
    r"^\W*(?:okay|ok|alright|all right|hmm+|um+|uh+|wait|well|oh|now|first(?:ly)?|next|alternatively|"
    r"actually|so,|so (?:let me|let's|i|we|the (?:problem|question))|let me|let's|i need to|i have to|"
    r"i should|i'll|i will|i want to|i think|i guess|we need to|we have to|"
    r"the (?:problem|question|task) (?:is asking|asks|says|states|wants|gives)|"
    r"in summary|to summarize|to sum up|to recap)\b",
    re.IGNORECASE,
)
_META_PHRASES = re.compile(
    r"\b(?:okay,? so|so,? let me|so,? let's|let me|let's|i need to|i have to|i should|i think|i'll|i will|"
    r"i want to|we need to|(?:check|see|verify|wonder|determine)(?:ing)? (?:if|whether)|"
    r"the (?:problem|question|task) (?:is asking|asks|says|states|wants|gives)|in summary|to summarize|"
    r"to sum up|to recap)\b",
    re.IGNORECASE,
)
_INFERENCE = re.compile(
    r"\b(?:therefore|thus|hence|so|because|since|if|then|implies|implied|implying|means|meaning|"
    r"follows|must|conclude|concludes|consequently)\b",
    re.IGNORECASE,
)


def _content_words(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if w not in _STOP_WORDS}


def _expressions(text: str) -> set[str]:
    return {re.sub(r"\s+", "", e).strip(".,;:!?") for e in _EXPRESSION.findall(text)}


@dataclass(frozen=True)
class RuleLabeller:
    """The documented rules of the module docstring; `label(chunks, question)` → (labels, rules)."""

    restate_overlap: float = 0.7
    summary_overlap: float = 0.8

    def label(self, chunks: Sequence[str], question: str) -> tuple[list[ChunkLabel], list[str]]:
        seen_words = _content_words(question)
        seen_numbers = set(_NUMBER.findall(question))
        seen_expressions = _expressions(question)
        question_words = set(seen_words)
        labels, rules = [], []
        for i, chunk in enumerate(chunks):
            words = _content_words(chunk)
            numbers, expressions = set(_NUMBER.findall(chunk)), _expressions(chunk)
            label, rule = self._rule(chunk, words, numbers - seen_numbers, expressions - seen_expressions,
                                     question_words, seen_words, earlier=i > 0)  # fmt: skip
            labels.append(label)
            rules.append(rule)
            seen_words |= words
            seen_numbers |= numbers
            seen_expressions |= expressions
        return labels, rules

    def _rule(self, chunk, words, new_numbers, new_expressions, question_words, seen_words, earlier):
        if not re.search(r"\w", chunk):
            return "non-reasoning", "empty"
        if new_expressions or new_numbers:
            return "reasoning", "computation"
        without_meta = _OPENER.sub(" ", _META_PHRASES.sub(" ", chunk))
        if (_OPENER.match(chunk) or not words) and not _INFERENCE.search(without_meta):
            return "non-reasoning", "meta"
        if _INFERENCE.search(chunk):
            return "reasoning", "inference"
        if len(words & question_words) >= self.restate_overlap * len(words):
            return "non-reasoning", "restatement"
        if earlier and len(words & seen_words) >= self.summary_overlap * len(words):
            return "non-reasoning", "summary"
        return "reasoning", "default"


# --- teacher labeller --------------------------------------------------------------------------------

LABEL_SYSTEM_PROMPT = """\
You label the chunks of a reasoning trace that solves a problem.

A chunk is "reasoning" when it moves the solution forward: it computes, derives, infers or decides
something. A chunk is "non-reasoning" when it only restates the problem, announces what comes next
or comments on the process (transitions such as "let me", "okay, so", "first, I need to
understand"), or repeats earlier content without any new computation.

Reply with one line per chunk, in order, exactly "<number>: reasoning" or "<number>: non-reasoning",
and nothing else."""

_LABEL_LINE = re.compile(
    r"^\W*(\d+)\s*[\]:.)\-–]*\s*\**\s*(non[- ]?reasoning|reasoning)\b", re.IGNORECASE | re.MULTILINE
)


def label_messages(question: str, chunks: Sequence[str], system_prompt: str | None = None) -> list[Message]:
    numbered = "\n".join(f"[{i}] {chunk.strip()}" for i, chunk in enumerate(chunks, start=1))
    user = f"Problem:\n{question}\n\nChunks of the reasoning ({len(chunks)}):\n{numbered}"
    system = LABEL_SYSTEM_PROMPT if system_prompt is None else system_prompt
    return ([Message(role="system", content=system)] if system else []) + [Message(role="user", content=user)]


def parse_labels(reply: str, count: int) -> list[ChunkLabel] | None:
    """One label per chunk from a teacher's reply (its own `<think>` block left out), or None when
    a chunk has no label, two different ones, or a number out of range appears."""
    split = split_reasoning(reply)
    if not split.closed:
        return None
    found: dict[int, ChunkLabel] = {}
    for match in _LABEL_LINE.finditer(split.final):
        number = int(match.group(1))
        label: ChunkLabel = "reasoning" if match.group(2).lower() == "reasoning" else "non-reasoning"
        if not 1 <= number <= count or found.get(number, label) != label:
            return None
        found[number] = label
    if len(found) != count:
        return None
    return [found[i] for i in range(1, count + 1)]


# --- the stage -------------------------------------------------------------------------------------


class ChunkedTrace(Record):
    """One trace's reasoning in chunks (chunks/<name>.parquet); "".join(chunks) is the reasoning."""

    problem_id: str
    sample_idx: int | None
    task: str
    chunks: list[str]
    labels: list[ChunkLabel]
    rules: list[str]  # per chunk: the rule that labelled it, or "teacher"
    labeller: str  # rules, teacher, or rules (teacher reply unparseable)


class ChunkConfig(TeacherOptions):
    name: str = Field(description="output name: chunks/<name> and the STT set curated/<name>")
    traces: str | None = Field(None, description="graded traces to chunk (graded/<name>)")
    data: str | None = Field(
        None,
        description="or a curated set of this run (curated/<name>) or a .jsonl/.parquet file of training examples",
    )
    keep: list[Label] = Field(
        ["correct"], min_length=1, description="with traces: labels of the traces to use"
    )
    chunking: Literal["boundary", "average"] = Field(
        "boundary",
        description="boundary: at paragraph/line/sentence boundaries up to max_words (a stand-in for SBC); "
        "average: `chunks` equal pieces (AC)",
    )
    max_words: int = Field(64, ge=1, description="boundary: most words in a chunk")
    min_words: int = Field(1, ge=1, description="boundary: shorter pieces join the next one")
    chunks: int = Field(4, ge=1, description="average: pieces per trace")
    labeller: Literal["rules", "teacher"] = Field("rules", description="rules (documented) or a teacher")
    restate_overlap: float = Field(
        0.7, ge=0, le=1, description="rules: a chunk this much made of question words restates it"
    )
    summary_overlap: float = Field(
        0.8,
        ge=0,
        le=1,
        description="rules: a chunk this much made of earlier words (and no new number) repeats them",
    )
    model: str | None = Field(None, description="labeller teacher: the model (labeller: teacher)")
    label_prompt: str | None = Field(
        None, description="labeller teacher: system prompt instead of the built-in one"
    )
    fallback: Literal["rules", "fail"] = Field(
        "rules", description="labeller teacher: on a reply without one label per chunk, use the rules or stop"
    )
    tokenizer: str | None = Field(
        None,
        description="tokenizer to count removed tokens with (a model reference, folder or Hub id; also the openai "
        "labeller's); default: words",
    )

    @model_validator(mode="after")
    def _one_input_and_a_teacher(self) -> ChunkConfig:
        if (self.traces is None) == (self.data is None):
            raise ValueError("give either traces (a graded set) or data (a curated set or file)")
        if self.labeller == "teacher" and not self.model:
            raise ValueError("labeller teacher needs a model")
        return self


@dataclass(frozen=True)
class Item:
    """A trace to chunk: from a graded set or a set of training examples."""

    problem: Problem  # for a file of examples: built from the example (no gold answer)
    sample_idx: int | None
    messages: list[Message]
    reasoning: str | None
    final: str
    completion: str


def load_items(cfg: ChunkConfig, run: RunDir) -> list[Item]:
    if cfg.traces is not None:
        problems = problems_by_id(run)
        items = []
        for row, trace in enumerate(read_records(run.graded(cfg.traces), GradedTrace)):
            if trace.label not in cfg.keep:
                continue
            if trace.problem_id not in problems:
                raise UserError(
                    f"{run.graded(cfg.traces)} row {row}: problem_id {trace.problem_id!r} is not in this run"
                )
            problem = problems[trace.problem_id]
            items.append(
                Item(
                    problem,
                    trace.sample_idx,
                    problem.messages,
                    trace.reasoning,
                    trace.final,
                    trace.completion,
                )
            )
        return items
    path, _ = training_data(cfg.data, run)
    items = []
    for example in read_records(path, TrainingExample):
        split = split_reasoning(example.completion)
        problem = Problem(id=example.problem_id, task=example.task, messages=example.messages, answer="")
        items.append(Item(problem, example.sample_idx, example.messages, split.reasoning if split.closed else None,
                          split.final, example.completion))  # fmt: skip
    return items


def _nothing_to_chunk(cfg: ChunkConfig, run: RunDir) -> str:
    if cfg.traces is not None:
        return f"graded/{cfg.traces} holds no traces labelled {' or '.join(cfg.keep)} to chunk"
    return f"{training_data_name(cfg.data, run, training_data(cfg.data, run)[0])} holds no examples to chunk"


def question_of(messages: Sequence[Message]) -> str:
    return "\n\n".join(m.content for m in messages if m.role == "user")


def chunk_text(text: str, cfg: ChunkConfig) -> list[str]:
    if cfg.chunking == "average":
        return average_chunks(text, cfg.chunks)
    return boundary_chunks(text, cfg.max_words, cfg.min_words)


def skip_thinking(chunks: Sequence[str], labels: Sequence[ChunkLabel]) -> tuple[list[str], list[int]]:
    """STT: the chunks without the non-reasoning ones between the first and the last; returns the
    kept chunks and the indices of the removed ones."""
    removed = [i for i in range(1, len(chunks) - 1) if labels[i] == "non-reasoning"]
    return [c for i, c in enumerate(chunks) if i not in removed], removed


def stt_completion(item: Item, record: ChunkedTrace) -> str:
    if item.reasoning is None:
        return item.completion
    kept, removed = skip_thinking(record.chunks, record.labels)
    if not removed:
        return item.completion
    return format_completion("".join(kept).strip(), item.final)


def chunk_and_label(
    items: list[Item],
    cfg: ChunkConfig,
    label_with_teacher: Callable[[list[tuple[Item, list[str]]]], dict] | None,
) -> tuple[list[ChunkedTrace], dict]:
    rules = RuleLabeller(cfg.restate_overlap, cfg.summary_overlap)
    chunked = [(item, chunk_text(item.reasoning, cfg) if item.reasoning else []) for item in items]
    teacher_labels = label_with_teacher([(i, c) for i, c in chunked if c]) if label_with_teacher else {}
    records, unparseable = [], []
    for position, (item, chunks) in enumerate(chunked):
        labels, reasons = rules.label(chunks, question_of(item.messages))
        labeller = "rules"
        if label_with_teacher and chunks:
            taught = teacher_labels.get(position)
            if taught is None:
                unparseable.append(item)
                labeller = "rules (teacher reply unparseable)"
            else:
                labels, reasons, labeller = taught, ["teacher"] * len(chunks), "teacher"
        records.append(
            ChunkedTrace(problem_id=item.problem.id, sample_idx=item.sample_idx, task=item.problem.task,
                         chunks=chunks, labels=labels, rules=reasons, labeller=labeller)
        )  # fmt: skip
    if unparseable and cfg.fallback == "fail":
        first = unparseable[0]
        raise UserError(
            f"chunk:{cfg.name}: the teacher's labels of {len(unparseable)} trace(s) could not be read, e.g. "
            f"{first.problem.id} sample {first.sample_idx}; set fallback: rules to label them with the rules"
        )
    with_chunks = [r for r in records if r.chunks]
    all_labels = [label for r in records for label in r.labels]
    stats = {
        "input": len(items),
        "with_reasoning": len(with_chunks),
        "chunking": cfg.chunking,
        "labeller": cfg.labeller,
        "chunks": len(all_labels),
        "chunks_per_trace": round(len(all_labels) / len(with_chunks), 2) if with_chunks else None,
        "chunk_words_mean": round(sum(count_words(c) for r in records for c in r.chunks) / len(all_labels), 2)
        if all_labels
        else None,
        "non_reasoning": all_labels.count("non-reasoning"),
        "non_reasoning_share": round(all_labels.count("non-reasoning") / len(all_labels), 4)
        if all_labels
        else None,
        "rules": dict(Counter(rule for r in records for rule in r.rules)),
    }
    if label_with_teacher:
        stats["teacher_unparseable"] = len(unparseable)
    return records, stats


def stt_set(
    items: list[Item], records: list[ChunkedTrace], count: LengthCounter
) -> tuple[list[TrainingExample], dict]:
    examples, removed_chunks, shortened, before, removed = [], 0, 0, 0, 0
    for item, record in zip(items, records, strict=True):
        completion = stt_completion(item, record)
        if record.chunks:
            dropped = skip_thinking(record.chunks, record.labels)[1]
            removed_chunks += len(dropped)
            shortened += bool(dropped)
            length = count(item.reasoning or "")
            before += length
            removed += length - count("".join(skip_thinking(record.chunks, record.labels)[0]))
        examples.append(TrainingExample(problem_id=item.problem.id, task=item.problem.task, messages=item.messages,
                                        completion=completion, sample_idx=item.sample_idx))  # fmt: skip
    stats = {
        "input": len(items),
        "kept": dict(Counter(e.task for e in examples)),
        "dropped": {},
        "problems": len({e.problem_id for e in examples}),
        "skip_thinking": {
            "traces_shortened": shortened,
            "removed_chunks": removed_chunks,
            "unit": count.unit,
            "reasoning_length": before,
            "removed": removed,
            "removed_share": round(removed / before, 4) if before else None,
        },
    }
    return examples, stats


def run_chunk(cfg: ChunkConfig, run: RunDir, overwrite: bool) -> None:
    if cfg.traces is not None:
        inputs = {"graded": graded_fingerprint(run, cfg.traces)}
    else:
        inputs = {"data": training_data(cfg.data, run)[1]}
    model = backend_model(cfg, cfg.model, run) if cfg.labeller == "teacher" else None
    if model:
        inputs["model"] = model.fingerprint
    key = f"chunk:{cfg.name}"
    usage: dict = {}

    def body(step_fingerprint: str) -> dict:
        items = load_items(cfg, run)
        if not items:
            raise UserError(f"{key}: {_nothing_to_chunk(cfg, run)}")
        teacher = None
        if model:

            def teacher(to_label: list[tuple[Item, list[str]]]) -> dict[int, list[ChunkLabel]]:
                position = {id(item): i for i, item in enumerate(items)}
                rows = [
                    PromptRow(item.problem, position[id(item)],
                              label_messages(question_of(item.messages), chunks, cfg.label_prompt))
                    for item, chunks in to_label
                ]  # fmt: skip
                if not rows:
                    return {}
                replies, index = run_teacher_job(
                    cfg, model, rows, run.chunks(cfg.name).with_suffix(".labels"), step_key=key,
                    step_fingerprint=step_fingerprint, source=json.dumps(teacher_source(cfg, model)), overwrite=overwrite,
                )  # fmt: skip
                usage.update(usage_stats(index, cfg.pricing, cfg.backend))
                labels = {}
                for (_item, chunks), row in zip(to_label, rows, strict=True):
                    reply = replies.get(row.key)
                    parsed = (
                        parse_labels(reply.completion, len(chunks))
                        if reply and reply.finish_reason == "stop"
                        else None
                    )
                    if parsed is not None:
                        labels[row.sample_idx] = parsed
                return labels

        records, stats = chunk_and_label(items, cfg, teacher)
        write_records(run.chunks(cfg.name), records, ChunkedTrace)
        return {**stats, **({"usage": usage} if usage else {})}

    chunked = run.step(key, cfg, inputs, body, outputs=[run.chunks(cfg.name)], overwrite=overwrite)
    if model:
        run.update_manifest(teacher_usage=usage_totals(run.manifest()))

    def stt_body(_fingerprint: str) -> dict:
        items = load_items(cfg, run)
        records = read_records(run.chunks(cfg.name), ChunkedTrace)
        if [(r.problem_id, r.sample_idx) for r in records] != [(i.problem.id, i.sample_idx) for i in items]:
            raise UserError(f"{run.chunks(cfg.name)}: its rows are not the input's; rerun with --overwrite")
        examples, stats = stt_set(items, records, LengthCounter(tokenizer_path(cfg.tokenizer, run)))
        write_records(run.curated(cfg.name), examples, TrainingExample)
        return stats

    stt = run.step(f"curate:{cfg.name}", cfg, {"chunks": chunked["fingerprint"]}, stt_body,
                   outputs=[run.curated(cfg.name)], overwrite=overwrite)["stats"]  # fmt: skip
    stats, skipped = chunked["stats"], stt["skip_thinking"]
    note(
        f"{key}: {stats['chunks']} chunks in {stats['with_reasoning']} traces ({stats['chunks_per_trace']} per trace), "
        f"{stats['non_reasoning_share']:.1%} non-reasoning; curate:{cfg.name} (STT): {skipped['removed_chunks']} chunks "
        f"removed from {skipped['traces_shortened']} traces, {skipped['removed']} {skipped['unit']} "
        f"({skipped['removed_share'] or 0:.1%} of the reasoning)"
        if stats["chunks"]
        else f"{key}: no reasoning to chunk in {stats['input']} traces"
    )


def _requirements(cfg: ChunkConfig) -> dict[str, str | tuple[str, ...]]:
    needs: dict[str, str | tuple[str, ...]] = (
        {"traces": graded_requirement(cfg.traces)}
        if cfg.traces is not None
        else dict(training_data_step(cfg.data))
    )
    if cfg.labeller == "teacher" and cfg.model:
        needs.update(backend_requirements(cfg, cfg.model))
    return needs


STAGE = Stage(
    "chunk",
    ChunkConfig,
    run_chunk,
    "cut reasoning into chunks labelled reasoning / non-reasoning, and write a Skip-Thinking (STT) set",
    produces=lambda cfg: [f"chunk:{cfg.name}", f"curate:{cfg.name}"],
    requires=_requirements,
)
