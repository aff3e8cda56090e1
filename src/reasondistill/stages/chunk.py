"""`chunk`: cut each trace's reasoning into chunks, label them reasoning / non-reasoning, and write a
Skip-Thinking STT set without the non-reasoning middle chunks.

The chunkers (`chunking: boundary | average`) are documented in curate/chunking.py, the labelling
rules (`labeller: rules`) in curate/labelling.py. With `labeller: teacher` a teacher (any backend)
labels the chunks of each trace, numbered, one line per chunk (curate/label_prompt.py); a reply that
does not give exactly one label to every chunk falls back to the rules for that trace (counted in the
stats) or, with `fallback: fail`, stops the step naming the trace. The raw replies are kept in
resumable shards in chunks/<name>.labels/.

Outputs: chunks/<name>.parquet (one row per trace: chunks, labels, the rule of each label) under
the step `chunk:<name>`, and the STT set curated/<name>.parquet (TrainingExamples: the reasoning
without its non-reasoning middle chunks, the first and last chunk and the final answer kept) under
a `curate:<name>` step, so `train` reads it like any curated set.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from pydantic import Field, model_validator

from ..chat import user_text
from ..curate.chunking import ChunkLabel, average_chunks, boundary_chunks, count_words, skip_thinking
from ..curate.label_prompt import label_messages, parse_labels
from ..curate.labelling import RuleLabeller
from ..curate.teacher_jobs import (
    LengthCounter,
    PromptRow,
    TeacherOptions,
    run_teacher_job,
    teacher_source,
    tokenizer_path,
)
from ..errors import UserError
from ..generate.shards import usage_stats, usage_totals
from ..modelref import backend_model, backend_requirements
from ..records import Label, Message, Problem, Record, TrainingExample, read_records, write_records
from ..rundir import RunDir
from ..store import TraceSet, graded_requirement, problems_by_id, trace_set, training_data_step
from ..ui import note
from ..verify.reasoning import format_completion, split_reasoning
from .base import Stage


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


def load_items(cfg: ChunkConfig, source: TraceSet, run: RunDir) -> list[Item]:
    """The traces to chunk: the graded ones labelled as `keep` (with their problems), or every
    training example of the set (a problem made of the example, without gold answer)."""
    if source.kind == "graded":
        problems = problems_by_id(run)
        items = []
        for row, trace in enumerate(source.read()):
            if trace.label not in cfg.keep:
                continue
            if trace.problem_id not in problems:
                raise UserError(
                    f"{source.path} row {row}: problem_id {trace.problem_id!r} is not in this run"
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
    items = []
    for example in source.read():
        split = split_reasoning(example.completion)
        problem = Problem(id=example.problem_id, task=example.task, messages=example.messages, answer="")
        items.append(Item(problem, example.sample_idx, example.messages, split.reasoning if split.closed else None,
                          split.final, example.completion))  # fmt: skip
    return items


def _nothing_to_chunk(cfg: ChunkConfig, source: TraceSet) -> str:
    if source.kind == "graded":
        return f"{source.description} holds no traces labelled {' or '.join(cfg.keep)} to chunk"
    return f"{source.description} holds no examples to chunk"


def chunk_text(text: str, cfg: ChunkConfig) -> list[str]:
    if cfg.chunking == "average":
        return average_chunks(text, cfg.chunks)
    return boundary_chunks(text, cfg.max_words, cfg.min_words)


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
        labels, reasons = rules.label(chunks, user_text(item.messages))
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
    source = trace_set(run, traces=cfg.traces, data=cfg.data)
    inputs = {"graded": source.fingerprint} if source.kind == "graded" else {"data": source.fingerprint}
    model = backend_model(cfg, cfg.model, run) if cfg.labeller == "teacher" else None
    if model:
        inputs["model"] = model.fingerprint
    key = f"chunk:{cfg.name}"
    usage: dict = {}

    def body(step_fingerprint: str) -> dict:
        items = load_items(cfg, source, run)
        if not items:
            raise UserError(f"{key}: {_nothing_to_chunk(cfg, source)}")
        teacher = None
        if model:

            def teacher(to_label: list[tuple[Item, list[str]]]) -> dict[int, list[ChunkLabel]]:
                position = {id(item): i for i, item in enumerate(items)}
                rows = [
                    PromptRow(item.problem, position[id(item)],
                              label_messages(user_text(item.messages), chunks, cfg.label_prompt))
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
        items = load_items(cfg, source, run)
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
