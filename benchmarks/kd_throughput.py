"""Training tokens per second of forward-KL distillation: reasondistill with an online teacher (like for
like) and with an offline top-k store, against TRL's online teacher.

The trainers distil the same randomly initialised teacher into the same student (testbed shapes:
`TEACHER_SHAPE`, `STUDENT_SHAPE`, the testbed tokenizer), with forward KL(teacher‖student) at
temperature 1 on completion tokens, from the same batches: testbed problems of all tasks with their
gold solutions as completions, in the same order, with the same optimizer, learning rate, batch
size and thread count, in one process.

* reasondistill, online teacher — `DistillationTrainer` with objective `forward_kl` and the teacher
  run on every batch, as TRL does: the like-for-like comparison (target: at least 1.3x TRL).
* reasondistill, offline top-k store — the same, but the teacher's top-k log-probabilities
  (k = `--top-k`) and tail mass are computed once before timing with the scoring stage's own
  functions (`from_logits`, `write_teacher_rows`) and arrive with each batch from
  `CompletionCollator`: no teacher runs during training. Not like for like: it skips the teacher's
  forward pass, which TRL cannot do (the scoring happens once, outside the timed steps).
* TRL — `GKDTrainer` (trl.experimental.gkd) at λ = 0 (no on-policy generation) and β = 0 (forward
  KL): every step runs the teacher forward on the batch and forms both models' full logits. Its data
  is pre-tokenized (input ids and completion mask, the same tokens), so its collator does not
  re-tokenize, and the model's activation checkpointing (on by default in its config) is off, as in
  ours.

Each trainer runs `--warmup` optimizer steps and then `--steps` timed ones (wall-clock: data
loading, forward, backward, optimizer), on a fresh copy of the same initial student. The two run
back to back `--repeats` times; the ratio is the median of the pairs' ratios, so that load from other
processes between pairs cancels out. Tokens/s counts the completion tokens the loss is computed on,
and all (prompt + completion) tokens, of the timed steps. `--teacher-hidden` / `--teacher-layers`
size the teacher up (intermediate size 4 × hidden, as the testbed's) to see the ratio at a more
realistic teacher : student cost.

`--real-vocab` runs the same comparison at Qwen2.5's vocabulary (151,936 head rows) with a student
896 wide and a teacher 1536 wide, 2 layers each (random weights, the real tokenizer from
../shared/data): where, as in real reasoning models, the vocabulary projection is a large part of a
step.

    .venv/bin/python benchmarks/kd_throughput.py [--steps 20] [--batch-size 8] [--top-k 20]
        [--teacher-hidden 128] [--teacher-layers 3] [--threads 1] [--repeats 5] [--real-vocab] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
from pathlib import Path
from statistics import median

import numpy as np
import torch
from datasets import Dataset
from transformers import PrinterCallback, Qwen2ForCausalLM, TrainerCallback, TrainingArguments

from reasondistill.generate.logprobs import from_logits
from reasondistill.objectives import make_objective
from reasondistill.objectives.base import IGNORE_INDEX
from reasondistill.records import TrainingExample
from reasondistill.tasks import TASKS
from reasondistill.testbed.models import STUDENT_SHAPE, TEACHER_SHAPE, ModelShape, _model_config
from reasondistill.testbed.tokenizer import build_tokenizer
from reasondistill.train.data import CompletionCollator, tokenize_examples
from reasondistill.train.stored_teacher import StoredTeacher, TeacherRows, write_teacher_rows
from reasondistill.train.trainer import DistillationTrainer

BASELINE = "TRL GKDTrainer λ=0, online teacher"
OURS = "reasondistill, offline top-k store"
OURS_ONLINE = "reasondistill, online teacher"


class StepClock(TrainerCallback):
    """perf_counter at the end of every optimizer step."""

    def __init__(self):
        self.ends: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())


def training_examples(count: int) -> list[TrainingExample]:
    """Testbed problems of every task in turn (default difficulties), gold solutions as completions."""
    problems = [task.sample("train", count, seed=0) for task in TASKS.values()]
    return [
        TrainingExample(
            problem_id=problem.id,
            task=problem.task,
            messages=problem.messages,
            completion=problem.solution,
            sample_idx=0,
        )
        for problem in (problems[i % len(problems)][i] for i in range(count))
    ]


@torch.no_grad()
def score(teacher, examples, tokenized, k: int, vocab: int, path: Path) -> TeacherRows:
    """The offline store: the teacher's top-k per completion token over the tokenizer's `vocab` tokens
    (not padded head rows), as `score` writes it, laid out for the rows in the file `path` as the
    train stage lays it out."""
    store = {}
    for example, tokens in zip(examples, tokenized, strict=True):
        start = tokens.prompt_length
        ids = torch.tensor(tokens.input_ids, dtype=torch.long)
        logits = teacher(input_ids=ids[None]).logits[0, start - 1 : -1, :vocab]
        store[(example.problem_id, 0)] = from_logits(logits, ids[start:], k)
    write_teacher_rows(examples, tokenized, StoredTeacher.from_rows(store, "benchmark store"), path)
    return TeacherRows(path)


def shared_arguments(args: argparse.Namespace, output_dir: str) -> dict:
    return dict(
        output_dir=output_dir,
        per_device_train_batch_size=args.batch_size,
        max_steps=args.warmup + args.steps,
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        optim="adamw_torch",
        train_sampling_strategy="sequential",  # the same batches, in the same order, for both
        activation_checkpointing=False,
        bf16=False,
        logging_strategy="no",
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        dataloader_pin_memory=False,
        remove_unused_columns=False,
        seed=0,
    )


def ours(args, student, tokenizer, tokenized, rows, output_dir, teacher=None) -> DistillationTrainer:
    """Ours, from the stored `rows` or, with `teacher` (and `rows` None), the teacher run on each batch."""
    dataset = Dataset.from_list(
        [
            {"input_ids": t.input_ids, "labels": t.labels, "length": len(t.input_ids), "index": i}
            for i, t in enumerate(tokenized)
        ]
    )
    objective = make_objective("forward_kl")
    return DistillationTrainer(
        model=student,
        args=TrainingArguments(**shared_arguments(args, output_dir)),
        train_dataset=dataset,
        data_collator=CompletionCollator(tokenizer.pad_token_id, objective, rows),
        processing_class=tokenizer,
        objective=objective,
        teacher=teacher,
        vocab_size=len(tokenizer),
    )


def trl_dataset(tokenizer, examples, tokenized) -> Dataset:
    """Pre-tokenized rows for TRL GKD's default collator (DataCollatorForChatML): the ids with the
    completion mask (its zeros are the prompt, what on-policy steps sample from), and the prompt
    text it requires beside them."""
    return Dataset.from_list(
        [
            {
                "prompt": tokenizer.apply_chat_template(
                    [m.model_dump() for m in e.messages], add_generation_prompt=True, tokenize=False
                ),
                "input_ids": t.input_ids,
                "completion_mask": (t.labels != IGNORE_INDEX).astype(np.int64),
            }
            for e, t in zip(examples, tokenized, strict=True)
        ]
    )


def trl(args, student, teacher, tokenizer, examples, tokenized, output_dir):
    """The baseline: TRL's GKD at λ = 0, β = 0, the teacher run on every batch."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    dataset = trl_dataset(tokenizer, examples, tokenized)
    config = GKDConfig(**shared_arguments(args, output_dir), lmbda=0.0, beta=0.0, temperature=1.0)
    return GKDTrainer(
        model=student, teacher_model=teacher, args=config, train_dataset=dataset, processing_class=tokenizer
    )


def step_ends(trainer) -> list[float]:
    """Train; perf_counter at the end of every optimizer step."""
    clock = StepClock()
    trainer.add_callback(clock)
    trainer.remove_callback(PrinterCallback)  # its line of final metrics
    trainer.train()
    return clock.ends


def throughput(ends: list[float], tokenized, args) -> dict:
    """Seconds and tokens/s of the timed steps (the batches after the warm-up ones)."""
    timed = tokenized[args.warmup * args.batch_size : (args.warmup + args.steps) * args.batch_size]
    seconds = ends[-1] - ends[args.warmup - 1]
    completion = sum(int((t.labels != IGNORE_INDEX).sum()) for t in timed)
    total = sum(len(t.input_ids) for t in timed)
    return {"seconds": seconds, "completion/s": completion / seconds, "tokens/s": total / seconds}


def add_shared_options(parser: argparse.ArgumentParser) -> None:
    """The options of the throughput benchmarks that time two trainers back to back."""
    parser.add_argument("--teacher-hidden", type=int, default=TEACHER_SHAPE.hidden_size)
    parser.add_argument("--teacher-layers", type=int, default=TEACHER_SHAPE.num_hidden_layers)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (models this small gain little from more, and timings on a shared"
        " machine stay stable with one)",
    )
    parser.add_argument("--repeats", type=int, default=5, help="back-to-back runs of the two; medians count")


def testbed_models(args: argparse.Namespace, folder: Path):
    """Checks the step counts, sets the threads; the testbed tokenizer (built in `folder`), a random
    frozen teacher of `--teacher-hidden` × `--teacher-layers` and a random testbed-shaped student."""
    if args.warmup < 1 or args.steps < 1:
        raise SystemExit(
            "--warmup and --steps must be at least 1: timing starts at the end of a warm-up step"
        )
    torch.set_num_threads(args.threads)
    tokenizer = build_tokenizer(folder / "tokenizer")
    teacher_shape = ModelShape(args.teacher_hidden, args.teacher_layers, 4 * args.teacher_hidden)
    torch.manual_seed(0)
    teacher = Qwen2ForCausalLM(_model_config(teacher_shape, tokenizer)).eval().requires_grad_(False)
    return tokenizer, teacher, Qwen2ForCausalLM(_model_config(STUDENT_SHAPE, tokenizer))


def real_vocab_models(args: argparse.Namespace, folder: Path):
    """`--real-vocab`: Qwen2.5's tokenizer (../shared/data) and random models with its 151,936 head
    rows, shaped like the embedding-heavy end of real students (real_vocab_step.py's shapes): a
    student 896 wide (Qwen2.5-0.5B's width) and a teacher 1536 wide (1.5B's), 2 layers each, untied
    teacher head. Both have the same rows, which TRL's loss needs."""
    from transformers import AutoTokenizer

    from reasondistill.testbed.real_vocab import QWEN_ROWS, build_real_tokenizer, save_random_model

    torch.set_num_threads(args.threads)
    source = Path(__file__).resolve().parents[2] / "shared" / "data" / "tokenizers" / "Qwen2.5-0.5B-Instruct"
    tokenizer_dir = build_real_tokenizer(source, folder / "tokenizer")
    save_random_model(
        tokenizer_dir, folder / "student", rows=QWEN_ROWS, hidden_size=896, heads=14, kv_heads=2
    )
    save_random_model(
        tokenizer_dir,
        folder / "teacher",
        rows=QWEN_ROWS,
        hidden_size=1536,
        heads=12,
        kv_heads=2,
        tie=False,
        seed=1,
    )
    teacher = Qwen2ForCausalLM.from_pretrained(folder / "teacher").eval().requires_grad_(False)
    student = Qwen2ForCausalLM.from_pretrained(folder / "student")
    return AutoTokenizer.from_pretrained(tokenizer_dir), teacher, student


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--real-vocab",
        action="store_true",
        help="Qwen2.5's vocabulary (151,936 rows) and real-width models instead of the testbed's",
    )
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps per trainer")
    parser.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps before them (>= 1)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=20, help="teacher tokens per position in the store")
    add_shared_options(parser)
    parser.add_argument("--quick", action="store_true", help="smoke test: 2 steps, batch 2, 1 repeat")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.batch_size, args.repeats = 2, 1, 2, 1
    with tempfile.TemporaryDirectory() as tmp:
        models = real_vocab_models if args.real_vocab else testbed_models
        tokenizer, teacher, initial_student = models(args, Path(tmp))
        examples = training_examples((args.warmup + args.steps) * args.batch_size)
        tokenized = tokenize_examples(tokenizer, examples, max_length=1024)
        started = time.perf_counter()
        rows = score(teacher, examples, tokenized, args.top_k, len(tokenizer), Path(tmp) / "rows.arrow")
        scoring = time.perf_counter() - started
        parameters = {
            name: sum(p.numel() for p in model.parameters())
            for name, model in (("teacher", teacher), ("student", initial_student))
        }
        print(
            f"teacher hidden {teacher.config.hidden_size} x {teacher.config.num_hidden_layers} layers"
            f" ({parameters['teacher']:,}"
            f" parameters), student hidden {initial_student.config.hidden_size} x"
            f" {initial_student.config.num_hidden_layers} layers ({parameters['student']:,}), vocab"
            f" {len(tokenizer)}; batch {args.batch_size},"
            f" {args.warmup} + {args.steps} steps, top-k {args.top_k}, threads {args.threads},"
            f" {args.repeats} repeats"
        )
        print(f"store: {len(rows)} sequences scored in {scoring:.2f} s before timing (not part of a step)")
        results: dict[str, list[dict]] = {OURS_ONLINE: [], OURS: [], BASELINE: []}
        for repeat in range(args.repeats):
            output_dir = str(Path(tmp) / f"run{repeat}")
            trainer = ours(
                args, copy.deepcopy(initial_student), tokenizer, tokenized, None, output_dir, teacher=teacher
            )
            results[OURS_ONLINE].append(throughput(step_ends(trainer), tokenized, args))
            trainer = ours(args, copy.deepcopy(initial_student), tokenizer, tokenized, rows, output_dir)
            results[OURS].append(throughput(step_ends(trainer), tokenized, args))
            trainer = trl(
                args, copy.deepcopy(initial_student), teacher, tokenizer, examples, tokenized, output_dir
            )
            results[BASELINE].append(throughput(step_ends(trainer), tokenized, args))
    print(f"\n{'trainer (median of repeats)':<36} {'s/step':>7} {'completion tok/s':>17} {'all tok/s':>10}")
    for name, runs in results.items():
        seconds, completion, total = (
            median(run[key] for run in runs) for key in ("seconds", "completion/s", "tokens/s")
        )
        print(f"{name:<36} {seconds / args.steps:>7.3f} {completion:>17,.0f} {total:>10,.0f}")
    for name, note in ((OURS_ONLINE, "like for like, target >= 1.3x"),
                       (OURS, "skips the teacher's forward pass, target >= 1.5x")):  # fmt: skip
        ratios = sorted(
            a["tokens/s"] / b["tokens/s"] for a, b in zip(results[name], results[BASELINE], strict=True)
        )
        print(
            f"ratio {name} / {BASELINE}: {median(ratios):.2f}x tokens/s ({note});"
            f" median of {len(ratios)} back-to-back runs, range {ratios[0]:.2f}-{ratios[-1]:.2f}x"
        )


if __name__ == "__main__":
    main()
