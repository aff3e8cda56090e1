"""What the analysis stages share: the texts they read, their output files, token log-probabilities."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..curate.sets import (
    graded_fingerprint,
    graded_requirement,
    training_data,
    training_data_name,
    training_data_step,
)
from ..errors import UserError
from ..records import GradedTrace, Message, TrainingExample, atomic_write_json, read_records
from ..rundir import RunDir
from ..stages import StageConfig

Table = tuple[list[str], list[list[str]]]
Section = tuple[str, Table]

LOGIT_CHUNK = 256  # positions projected onto the vocabulary at once (as the hf backend does)


# ---- the texts an analysis reads ------------------------------------------------------------------
class TextSelection(StageConfig):
    """One of: a graded set, a curated set (or file), or a model's evaluation completions."""

    traces: str | None = Field(None, description="a graded set of the run (graded/<name>), with labels")
    data: str | None = Field(
        None,
        description="a curated set of the run (curated/<name>) or a .jsonl/.parquet file of training "
        "examples (no labels)",
    )
    eval_model: str | None = Field(
        None,
        description="the evaluation completions of a model (eval/<eval_model>/<task>.<decoding>.parquet, "
        "with labels; the model's name in the run, e.g. `student` or `teacher`)",
    )
    decoding: Literal["greedy", "sampled"] = Field(
        "greedy", description="with eval_model: which evaluation completions"
    )
    tasks: list[str] | None = Field(None, description="only these tasks (default: all)")
    limit: int | None = Field(None, ge=1, description="at most this many texts per task (in file order)")

    @model_validator(mode="after")
    def _one_source(self) -> TextSelection:
        if sum(x is not None for x in (self.traces, self.data, self.eval_model)) > 1:
            raise ValueError("set one of traces (a graded set), data (a curated set) or eval_model")
        return self


@dataclass
class Text:
    problem_id: str
    task: str
    sample_idx: int | None
    completion: str
    label: str | None  # None for training examples, which carry no grade
    completion_tokens: int | None  # as the generator counted them (graded and evaluation sets)
    messages: list[Message] | None  # the prompt; None until joined with the run's problems


def only_tasks(items: list, tasks: list[str] | None, limit: int | None, where: str) -> list:
    """The items (anything with a `.task`) of `tasks`, at most `limit` per task in order; an error
    naming `where` for a task with no items, or when nothing is left."""
    if tasks is not None:
        missing = sorted(set(tasks) - {item.task for item in items})
        if missing:
            raise UserError(f"{where}: no texts of task {missing[0]!r}")
        items = [item for item in items if item.task in tasks]
    if limit is not None:
        seen: Counter = Counter()
        limited = []
        for item in items:
            seen[item.task] += 1
            if seen[item.task] <= limit:
                limited.append(item)
        items = limited
    if not items:
        raise UserError(f"{where} holds no texts to analyse")
    return items


def selection_source(sel: TextSelection, default_eval_model: str | None = None) -> tuple[str, str]:
    """(kind, name) of the selected texts: ("graded" | "curated" | "eval", name)."""
    if sel.traces is not None:
        return "graded", sel.traces
    if sel.data is not None:
        return "curated", sel.data
    if sel.eval_model is not None or default_eval_model is not None:
        return "eval", sel.eval_model or default_eval_model
    raise UserError("no texts selected: set traces (a graded set), data (a curated set) or eval_model")


def selection_requirements(
    sel: TextSelection, default_eval_model: str | None = None
) -> dict[str, str | tuple[str, ...]]:
    """The step that writes the selected texts, for a Stage's `requires`."""
    if sel.traces is None and sel.data is None and sel.eval_model is None and default_eval_model is None:
        return {}
    kind, name = selection_source(sel, default_eval_model)
    if kind == "graded":
        return {"traces": graded_requirement(name)}
    if kind == "curated":
        return training_data_step(name)
    return {"eval_model": f"eval:{name}"}


def load_texts(
    sel: TextSelection, run: RunDir, step: str, default_eval_model: str | None = None
) -> tuple[list[Text], str, str]:
    """The selected texts, a description of where they come from, and that input's fingerprint; an
    error naming `step` and the set when none are selected."""
    kind, name = selection_source(sel, default_eval_model)
    if kind == "graded":
        fingerprint = graded_fingerprint(run, name)
        rows = read_records(run.graded(name), GradedTrace)
        texts = [_from_graded(t) for t in rows]
        description = f"graded/{name}"
    elif kind == "curated":
        path, fingerprint = training_data(name, run)
        texts = [
            Text(e.problem_id, e.task, e.sample_idx, e.completion, None, None, list(e.messages))
            for e in read_records(path, TrainingExample)
        ]
        description = training_data_name(name, run, path)
    else:
        fingerprint = run.finished_step(f"eval:{name}")["fingerprint"]
        files = sorted(run.eval_dir(name).glob(f"*.{sel.decoding}.parquet"))
        if not files:
            raise UserError(f"{run.eval_dir(name)}: no {sel.decoding} evaluation completions")
        texts = [_from_graded(t) for path in files for t in read_records(path, GradedTrace)]
        description = f"eval/{name} ({sel.decoding})"
    texts = only_tasks(texts, sel.tasks, sel.limit, f"{step}: {description}")
    return texts, description, fingerprint


def _from_graded(trace: GradedTrace) -> Text:
    return Text(
        trace.problem_id, trace.task, trace.sample_idx, trace.completion, trace.label,
        trace.completion_tokens, None,
    )  # fmt: skip


def join_prompts(texts: Sequence[Text], run: RunDir, description: str) -> None:
    """Give every text its prompt from the run's problems (graded and evaluation sets store only ids)."""
    if all(t.messages is not None for t in texts):
        return
    from ..tasks.stage import problems_by_id

    problems = problems_by_id(run)
    for text in texts:
        if text.messages is None:
            problem = problems.get(text.problem_id)
            if problem is None:
                raise UserError(
                    f"{description}: problem {text.problem_id!r} is not among the problems of {run.root} "
                    "(benchmark completions do not store their prompts; trace testbed tasks, or a curated set)"
                )
            text.messages = list(problem.messages)


# ---- output files ---------------------------------------------------------------------------------
def write_analysis(run: RunDir, name: str, kind: str, result: dict) -> None:
    """analysis/<name>.json, refusing to replace another kind of analysis of the same name."""
    path = run.analysis(name)
    if path.exists():
        try:
            previous = json.loads(path.read_text()).get("kind")
        except (json.JSONDecodeError, AttributeError):
            previous = None
        if previous not in (None, kind):
            raise UserError(f"{path}: holds a {previous} analysis; give this {kind} analysis another name")
    atomic_write_json(path, {"kind": kind, "name": name, **result})


def analyses(run: RunDir, kind: str) -> list[dict]:
    """Every analysis/<name>.json of this kind in the run, by name."""
    found = []
    for path in sorted((run.root / "analysis").glob("*.json")):
        try:
            result = json.loads(path.read_text())
        except json.JSONDecodeError:
            continue
        if isinstance(result, dict) and result.get("kind") == kind:
            found.append(result)
    return found


def percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def number(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


# ---- models ---------------------------------------------------------------------------------------
def check_same_tokenizer(tokenizers: Sequence[tuple[str, PreTrainedTokenizerBase]], purpose: str) -> None:
    """Refuse models that do not number tokens alike (vocabulary, EOS, chat template)."""
    (first_name, first), *others = tokenizers
    for name, other in others:
        difference = None
        if first.get_vocab() != other.get_vocab():
            vocab, theirs = first.get_vocab(), other.get_vocab()
            token = next(
                (t for t, i in sorted(vocab.items(), key=lambda x: x[1]) if theirs.get(t) != i), None
            )
            difference = (
                f"token {token!r} is id {vocab[token]} for {first_name}, "
                f"{'id ' + str(theirs[token]) if token in theirs else 'absent'} for {name}"
                if token is not None
                else f"{name} has {len(theirs) - len(vocab)} more tokens"
            )
        elif first.eos_token_id != other.eos_token_id:
            difference = f"EOS {first.eos_token!r} for {first_name}, {other.eos_token!r} for {name}"
        elif first.chat_template != other.chat_template:
            difference = "the chat templates differ, so one conversation becomes different token ids"
        if difference:
            raise UserError(
                f"{purpose} needs models that share one tokenizer; {first_name} and {name} do not: {difference}"
            )


@torch.inference_mode()
def completion_logprobs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[list[int]],
    completions: Sequence[list[int]],
    batch_size: int,
    progress: Callable[[int], None] | None = None,
) -> list[np.ndarray]:
    """log p(token | prompt, earlier completion tokens) of every completion token, float32.

    Batched by length (right padding keeps positions 0..len-1), no gradients, the final hidden
    states projected onto the vocabulary `LOGIT_CHUNK` positions at a time (a [T, V] float32 block
    for every sequence would not fit for a 150k-token vocabulary). Rows of the head beyond the
    tokenizer (padding) are left out of the softmax, as in the hf backend.
    """
    from ..train.teachers import check_head

    check_head(model, str(model.config.name_or_path))
    head = model.get_output_embeddings()
    real_tokens = min(len(tokenizer), head.weight.shape[0])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = model.device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(completions[i]))
    results: list[np.ndarray | None] = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        sequences = [list(prompts[i]) + list(completions[i]) for i in rows]
        width = max(len(s) for s in sequences)
        input_ids = torch.full((len(rows), width), pad)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for row, sequence in enumerate(sequences):
            input_ids[row, : len(sequence)] = torch.tensor(sequence)
            attention[row, : len(sequence)] = 1
        hidden = model.get_decoder()(
            input_ids=input_ids.to(device), attention_mask=attention.to(device)
        ).last_hidden_state
        for row, i in enumerate(rows):
            p, c = len(prompts[i]), len(completions[i])
            if c == 0:
                results[i] = np.zeros(0, dtype=np.float32)
                continue
            if p == 0:
                raise ValueError("a completion is scored after a prompt of at least one token")
            states = hidden[row, p - 1 : p + c - 1]  # the state at position j predicts token j + 1
            targets = torch.tensor(completions[i], device=device)
            parts = [
                torch.log_softmax(head(chunk)[:, :real_tokens].float(), dim=-1).gather(-1, target[:, None])[
                    :, 0
                ]
                for chunk, target in zip(states.split(LOGIT_CHUNK), targets.split(LOGIT_CHUNK), strict=True)
            ]
            results[i] = torch.cat(parts).cpu().numpy().astype(np.float32)
        if progress:
            progress(len(rows))
    return results  # type: ignore[return-value]


def fast_tokenizer(tokenizer: PreTrainedTokenizerBase, name: str) -> PreTrainedTokenizerBase:
    if not tokenizer.is_fast:
        raise UserError(
            f"{name}: a fast (Rust) tokenizer is needed to map tokens to sentences (character offsets)"
        )
    return tokenizer
