"""A thin `transformers.Trainer` whose loss is a registered objective.

Distribution (accelerate, DeepSpeed, FSDP), PEFT, mixed precision, checkpointing and resumption
stay the Trainer's job; this module only chooses the loss and prepares the data.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from pydantic import BaseModel, ConfigDict, Field
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from ..errors import UserError
from ..objectives import IGNORE_INDEX, Objective, ObjectiveInputs, get_objective
from ..records import TrainingExample
from .data import CompletionCollator, SortedStepSampler, tokenize_examples

log = logging.getLogger(__name__)


class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    objective: str = Field("sft", description="training objective, by registered name")
    epochs: float = Field(3.0, gt=0, description="passes over the training data")
    learning_rate: float = Field(1e-5, gt=0, description="peak learning rate")
    lr_scheduler: str = Field(
        "cosine", description="transformers scheduler name (linear, cosine, constant, ...)"
    )
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="fraction of steps spent warming up")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    batch_size: int = Field(8, ge=1, description="examples per device per micro-batch")
    gradient_accumulation_steps: int = Field(1, ge=1, description="micro-batches per optimizer step")
    max_length: int = Field(
        2048, ge=8, description="tokens per example (prompt + completion); longer ones are cut"
    )
    sort_within_step: bool = Field(
        True,
        description="sort each optimizer step's examples by length into its micro-batches: less padding, same update",
    )
    precision: str = Field(
        "auto", pattern="^(auto|fp32|bf16|fp16)$", description="auto: bf16 on a GPU that has it, else fp32"
    )
    save_steps: int = Field(500, ge=1, description="optimizer steps between resumable checkpoints")
    logging_steps: int = Field(10, ge=1, description="optimizer steps between loss log lines")
    seed: int = Field(0, description="seed of the data order")
    trainer_args: dict[str, Any] = Field(
        default_factory=dict, description="extra transformers.TrainingArguments (e.g. deepspeed, fsdp)"
    )


class DistillationTrainer(Trainer):
    """`transformers.Trainer` computing a registered objective on completion tokens."""

    def __init__(self, *args, objective: Objective, sort_within_step: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.objective = objective
        self.sort_within_step = sort_within_step
        # Objectives divide by the completion tokens of the whole global batch (`num_items_in_batch`),
        # so the Trainer must count them and must not divide by the accumulation steps once more.
        self.model_accepts_loss_kwargs = True

    def _get_train_sampler(self, train_dataset=None):
        if not self.sort_within_step or self.args.train_sampling_strategy != "random":
            return super()._get_train_sampler(train_dataset)
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        step = (
            self.args.per_device_train_batch_size
            * self.args.gradient_accumulation_steps
            * self.args.world_size
        )
        return SortedStepSampler([len(ids) for ids in dataset["input_ids"]], step, seed=self.args.seed)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        normaliser = (
            num_items_in_batch if num_items_in_batch is not None else labels[:, 1:].ne(IGNORE_INDEX).sum()
        )
        loss = self.objective(ObjectiveInputs(outputs.logits, labels, normaliser))
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # num_items_in_batch counts the tokens of every process, and DDP averages gradients over
            # processes: scale back so that the result is sum / global tokens.
            loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss


def _precision_flags(precision: str) -> dict[str, bool]:
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}


def train_model(
    init: Path,
    examples: Sequence[TrainingExample],
    output_dir: Path,
    hp: Hyperparameters,
    *,
    description: str = "train",
    resume_key: str = "",
) -> dict:
    """Train the model at `init` on `examples` and save it (with its tokenizer) to `output_dir`.

    An interrupted run resumes from the newest checkpoint in `.<output_dir>.work` if that was made
    with the same `resume_key` (the step fingerprint), and starts afresh otherwise; the finished
    model appears at `output_dir` atomically. Returns training statistics.
    """
    objective = get_objective(hp.objective)
    if objective.needs_teacher:
        raise UserError(f"objective {hp.objective!r} needs a teacher; this training path has none")
    if not examples:
        raise UserError(f"{description}: no training examples")
    tokenizer = AutoTokenizer.from_pretrained(init)
    tokenized = tokenize_examples(tokenizer, examples, hp.max_length)
    truncated = sum(t.truncated for t in tokenized)
    if truncated:
        log.warning(
            "%s: %d of %d examples are longer than max_length=%d and were cut",
            description,
            truncated,
            len(tokenized),
            hp.max_length,
        )
    dataset = Dataset.from_list([{"input_ids": t.input_ids, "labels": t.labels} for t in tokenized])

    work_dir = output_dir.with_name(f".{output_dir.name}.work")
    ours = dict(
        output_dir=str(work_dir),
        num_train_epochs=hp.epochs,
        learning_rate=hp.learning_rate,
        lr_scheduler_type=hp.lr_scheduler,
        warmup_steps=hp.warmup_ratio,
        weight_decay=hp.weight_decay,
        per_device_train_batch_size=hp.batch_size,
        gradient_accumulation_steps=hp.gradient_accumulation_steps,
        save_strategy="steps",
        save_steps=hp.save_steps,
        save_total_limit=1,
        logging_steps=hp.logging_steps,
        seed=hp.seed,
        report_to=[],
        remove_unused_columns=False,
        dataloader_pin_memory=torch.cuda.is_available(),
        **_precision_flags(hp.precision),
    )
    duplicated = sorted(ours.keys() & hp.trainer_args.keys())
    if duplicated:
        raise UserError(
            f"{description}: trainer_args.{duplicated[0]} is set by reasondistill; use its own option instead"
        )
    key_file = work_dir / "resume_key"
    if work_dir.is_dir() and (not key_file.exists() or key_file.read_text() != resume_key):
        log.info("%s: discarding checkpoints of an unfinished run with other settings", description)
        shutil.rmtree(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    key_file.write_text(resume_key)
    try:
        args = TrainingArguments(**ours, **hp.trainer_args)
    except (TypeError, ValueError) as err:
        raise UserError(f"{description}: invalid training arguments: {err}") from None

    model = AutoModelForCausalLM.from_pretrained(init, dtype=torch.float32)
    trainer = DistillationTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=CompletionCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        objective=objective.fn,
        sort_within_step=hp.sort_within_step,
    )
    resume_from = get_last_checkpoint(str(work_dir))
    if resume_from:
        log.info("%s: resuming from %s", description, resume_from)
    result = trainer.train(resume_from_checkpoint=resume_from)

    stats = {
        "init": str(init),
        "examples": len(tokenized),
        "truncated_examples": truncated,
        "completion_tokens": sum(sum(label != IGNORE_INDEX for label in t.labels) for t in tokenized),
        "steps": trainer.state.global_step,
        "train_loss": result.training_loss,
        "seconds": result.metrics.get("train_runtime"),
        "parameters": sum(p.numel() for p in model.parameters()),
        "loss_curve": [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e],
    }
    staging = output_dir.with_name(f".{output_dir.name}.final")
    shutil.rmtree(staging, ignore_errors=True)
    trainer.save_model(str(staging))
    tokenizer.save_pretrained(str(staging))
    (staging / "training_stats.json").write_text(json.dumps(stats, indent=2))
    shutil.rmtree(output_dir, ignore_errors=True)
    staging.rename(output_dir)
    shutil.rmtree(work_dir, ignore_errors=True)
    return stats
