"""What a student makes of each candidate teacher's traces: its negative log-likelihood of them, and
a proxy distillation on them (select_teacher's measurements that need the student's weights).

- trace length in the student's tokens (end-of-turn token included), over all of a teacher's traces;
- the student's mean per-token negative log-likelihood of the teacher's correct traces (prompt and
  completion tokenized with the student's tokenizer and chat template, as `train` tokenizes them;
  the end-of-turn token included);
- a proxy distillation: the student trained briefly from its initial weights on the teacher's
  correct traces (the same optimizer steps for every teacher), then greedy accuracy on held-out
  problems, graded by each task's grader.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..chat import completion_ids
from ..evaluate.harness import EvalOptions, evaluate_model
from ..generate.scoring import teacher_forced
from ..modelref import ResolvedModel
from ..models import ModelLoading, load_tokenizer, torch_dtype
from ..records import GradedTrace, Problem, TrainingExample, atomic_write_json
from ..rundir import RunDir
from ..tasks.selection import GraderChoice
from ..train.data import tokenize_examples
from ..train.teachers import load_frozen
from ..train.trainer import train_model
from ..ui import note, progress_bar
from .teacher_selection import ProxyOptions, mean_std, training_examples


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def completion_nll(
    model: torch.nn.Module,
    tokenizer,
    examples: list[TrainingExample],
    batch_size: int,
    max_length: int,
    chunk_size: int = 512,
    progress=None,
) -> list[tuple[float, int]]:
    """(summed NLL in nats, completion tokens) of each example under `model`, in the examples' order.

    The tokens are those `train` computes its loss on (`tokenize_examples`: the chat-templated prompt,
    then the completion and the end-of-turn token, cut to `max_length`; only completion positions
    count). Teacher-forced (`teacher_forced`), batched by length, `chunk_size` positions projected
    onto the vocabulary at a time; the softmax covers every row of the head, as the SFT loss does
    (the trainer cuts padding rows only beside a teacher), and each example's NLL is summed in float64.
    """
    prompts, completions = [], []
    for example in tokenize_examples(tokenizer, examples, max_length):
        prompts.append(example.input_ids[: example.prompt_length].tolist())
        completions.append(example.input_ids[example.prompt_length :].tolist())
    chunks = teacher_forced(
        model, prompts, completions, _token_nll, batch_size=batch_size, vocab_size=None,
        chunk_size=chunk_size, by_length=True, progress=progress,
    )  # fmt: skip
    return [
        (float(torch.cat(parts).double().sum()), len(completion))
        for parts, completion in zip(chunks, completions, strict=True)
    ]


def _token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")


def student_statistics(
    student: ResolvedModel,
    graded: dict[str, list[GradedTrace]],
    problems: dict[str, Problem],
    batch_size: int,
    max_length: int,
    loading: ModelLoading | None = None,
) -> dict[str, dict]:
    """Per teacher: trace length in the student's tokens (all traces) and the student's NLL (correct ones),
    scored `batch_size` sequences at a time, each cut to `max_length` tokens; the student loaded as
    `loading` says (dtype, attention kernel)."""
    loading = loading or ModelLoading()
    tokenizer = load_tokenizer(student.path)
    device = _device()
    model = load_frozen(student.path, device, torch_dtype(loading.dtype, device), loading.attn_implementation)
    total = sum(sum(t.label == "correct" for t in traces) for traces in graded.values())
    stats = {}
    with progress_bar(f"student NLL ({student.name})", total=total, unit="traces") as bar:
        for teacher, traces in graded.items():
            encoded = completion_ids(tokenizer, [t.completion for t in traces])  # with the end of turn
            length_mean, length_std = mean_std([float(len(ids)) for ids in encoded])
            scored = completion_nll(
                model, tokenizer, training_examples(traces, problems), batch_size, max_length,
                progress=bar.advance,
            )  # fmt: skip
            tokens = sum(count for _, count in scored)
            stats[teacher] = {
                "length_mean": length_mean,
                "length_std": length_std,
                "nll_tokens": tokens,
                "student_nll": sum(nll for nll, _ in scored) / tokens if tokens else None,
            }
    del model
    return stats


def proxy_distillation(
    teacher: str,
    examples: list[TrainingExample],
    student: ResolvedModel,
    test_problems: dict[str, list[Problem]],
    proxy: ProxyOptions,
    graders: GraderChoice,
    workspace: RunDir,
    step_fingerprint: str,
    step: str,
    loading: ModelLoading | None = None,
) -> dict:
    """Train the student on one teacher's correct traces and evaluate it greedily on held-out problems.

    `workspace` is laid out like a run: the proxy student goes to its checkpoints/<teacher>, its
    evaluation to eval/<teacher>. A finished teacher is recorded in proxy/<teacher>.json there with the
    fingerprint of `step` (the select_teacher step, which messages name), so an interrupted step
    resumes with the next teacher.
    """
    record = workspace.root / "proxy" / f"{teacher}.json"
    if record.exists():
        previous = json.loads(record.read_text())
        if previous.get("fingerprint") == step_fingerprint:
            note(f"{step}: proxy student of {teacher} finished earlier, reused")
            return previous["result"]
    if not examples:
        note(f"{step}: no proxy student for {teacher}: it has no correct traces")
        result = {"accuracy": None, "by_task": {}, "examples": 0, "note": "no correct traces to train on"}
        atomic_write_json(record, {"fingerprint": step_fingerprint, "result": result})
        return result
    hp = proxy.hyperparameters()
    note(f"{step}: proxy distillation on {teacher}: {len(examples)} correct traces")
    training = train_model(
        Path(student.path), examples, workspace.checkpoint(teacher), hp,
        grader_for=graders.grader_for, description=f"{step}:{teacher}",
        resume_key=f"{step_fingerprint}-{teacher}",
    )  # fmt: skip
    eval_options = EvalOptions(
        n=0, greedy=True, max_new_tokens=proxy.max_new_tokens, batch_size=proxy.eval_batch_size,
        graders=graders.graders, **(loading or ModelLoading()).loading(),
    )  # fmt: skip
    eval_options.bind_sets(graders.bound_sets)
    model = ResolvedModel(teacher, str(workspace.checkpoint(teacher)), step_fingerprint)
    evaluation = evaluate_model(model, test_problems, eval_options, workspace.eval_dir(teacher))
    by_task = {task: acc["greedy"] for task, acc in evaluation["accuracy"].items()}
    counts = {task: len(problems) for task, problems in test_problems.items()}
    result = {
        "accuracy": sum(by_task[t] * counts[t] for t in by_task) / sum(counts.values()),
        "by_task": by_task,
        "problems": counts,
        "examples": len(examples),
        "steps": training["steps"],
        "train_loss": training["train_loss"],
        "seconds": training["seconds"],
    }
    atomic_write_json(record, {"fingerprint": step_fingerprint, "result": result})
    return result
