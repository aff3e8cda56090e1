"""A thin `transformers.Trainer` whose loss is a registered objective.

Distribution (accelerate, DeepSpeed, FSDP), PEFT, mixed precision, checkpointing and resumption
stay the Trainer's job; this module only chooses the loss and prepares the data.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate.utils import gather_object
from datasets import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from ..chat import reasoning_preflight
from ..errors import UserError
from ..generate.base import Generator
from ..models import load_causal_lm, load_config, load_tokenizer, loading_kwargs
from ..objectives import Objective, build_objective
from ..objectives.base import IGNORE_INDEX, ObjectiveInputs
from ..objectives.heads import Head, SparseTargets
from ..processes import cpu_processes, is_main, on_main
from ..records import PairExample, Problem, TrainingExample
from ..tasks import default_grader
from ..verify.graders import Grader
from .data import (
    CompletionCollator,
    SharedTokenIds,
    SortedStepSampler,
    tokenize_examples,
    tokenize_pairs,
)
from .hyperparameters import Hyperparameters, missing_inputs
from .lora import LoraOptions, check_targets, quantized_loading, trainable_parameters, with_lora
from .on_policy import StepBatches, collate_indices, merged_history, on_policy_stats, prompt_rows
from .on_policy_options import TEACHER_SELF, OnPolicyOptions, on_policy_problem
from .sharding import check_sharding
from .stored_teacher import StoredTeacher, TeacherRows, write_teacher_rows
from .teachers import (
    causal_lm,
    check_head,
    final_hidden_states,
    head_rows,
    inside_forward,
    load_beside_student,
    output_head,
    partitioned,
    preflight,
)

log = logging.getLogger(__name__)


class DistillationTrainer(Trainer):
    """`transformers.Trainer` computing a registered objective on completion positions.

    The student's logits are never formed for the whole batch: the forward pass stops at the final
    hidden states, and the objective projects completion positions chunk by chunk. The teacher is a
    frozen model run on the same ids (`teacher`), or stored top-k distributions that arrive with
    the batch (`teacher_topk_*` from the collator); `reference` is a frozen model some objectives
    compare against (DPO, AdaSPEC).
    """

    def __init__(
        self,
        *args,
        objective: Objective,
        teacher: torch.nn.Module | None = None,
        reference: torch.nn.Module | None = None,
        vocab_size: int | None = None,
        logit_chunk_size: int = 512,
        sort_within_step: bool = False,
        teacher_is_student: bool = False,
        step_batches: StepBatches | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.objective = objective
        self.teacher, self.reference = teacher, reference
        self.teacher_is_student = teacher_is_student  # OPSD: the current weights, without gradient
        self.step_batches = step_batches  # on-policy: rebuilds each step's batches from the student's samples
        self.vocab_size = vocab_size
        self.logit_chunk_size = logit_chunk_size
        self.sort_within_step = sort_within_step
        check_head(self.model, "student")
        if self.args.n_gpu > 1:
            # DataParallel replicas would all fire the hook that captures the final hidden states
            raise UserError(
                "several GPUs in one process (torch DataParallel) are not supported: start one process "
                "per GPU with `accelerate launch` or torchrun"
            )
        # Objectives divide by the completion tokens of the whole global batch (`num_items_in_batch`),
        # so the Trainer must count them and must not divide by the accumulation steps once more.
        self.model_accepts_loss_kwargs = True
        self.add_callback(ObjectiveStateCallback(objective))
        if self.args.fsdp and not self.is_fsdp_enabled:
            # accelerate 1.x switches to FSDP on accelerators only (MULTI_GPU, …; accelerate/state.py),
            # not for a gloo group of CPU processes: the run would be plain data parallel, unsharded
            log.warning(
                "fsdp was asked for but accelerate did not enable it (it shards on GPUs and other "
                "accelerators only, not on CPU processes): training runs unsharded, as data parallel"
            )

    def restore_objective_state(self, checkpoint: str | Path) -> None:
        """Give the objective the state it had when `checkpoint` was saved (TAID's t), if it had one."""
        saved = Path(checkpoint) / OBJECTIVE_STATE
        if saved.is_file():
            self.objective.load_state_dict(json.loads(saved.read_text()))

    def _get_train_sampler(self, train_dataset=None):
        if not self.sort_within_step or self.args.train_sampling_strategy != "random":
            return super()._get_train_sampler(train_dataset)
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        step = (
            self.args.per_device_train_batch_size
            * self.args.gradient_accumulation_steps
            * self.args.world_size
        )
        return SortedStepSampler(dataset["length"], step, seed=self.args.seed)

    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device):
        """The step's micro-batches; on-policy, rebuilt from samples before their tokens are counted."""
        if self.step_batches is None:
            return super().get_batch_samples(epoch_iterator, num_batches, device)
        batches = list(itertools.islice(epoch_iterator, num_batches))
        if batches:
            batches = self.step_batches(self, batches)
        return batches, self._get_num_items_in_batch(batches, device)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """The Trainer's log line (and every tracker's), with the objective's own terms since the last
        line (`<objective>/<term>`: TSD-KD's parts, TAID's t, KDRL's KL) and the on-policy statistics."""
        if "loss" in logs:
            terms = self.objective.logged_terms()
            logs.update({f"{self.objective.name}/{name}": value for name, value in terms.items()})
            if self.step_batches is not None:
                logs.update(self.step_batches.recent_metrics())
        super().log(logs, start_time)

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device):
        if self.objective.data != "pairs":
            return super()._get_num_items_in_batch(batch_samples, device)
        pairs = torch.tensor(sum(len(batch["input_ids"]) // 2 for batch in batch_samples), device=device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            pairs = self.accelerator.gather(pairs).sum()
        return pairs

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        input_ids, labels = inputs["input_ids"], inputs["labels"]
        layout = batch_layout(inputs)
        progress = self.state.global_step / max(self.state.max_steps, 1)
        # input noise is part of training only (the Trainer also calls this for evaluation)
        student_ids = (
            self.objective.corrupt_inputs(input_ids, labels, progress) if model.training else input_ids
        )
        # Position t predicts token t + 1: keep the positions whose next token is a completion token.
        predicts = labels[:, 1:] != IGNORE_INDEX
        hidden = final_hidden_states(model, student_ids, layout)[:, :-1][predicts]
        counted_globally = num_items_in_batch is not None
        if not counted_globally:
            num_items_in_batch = len(labels) // 2 if self.objective.data == "pairs" else predicts.sum()
        if torch.is_tensor(num_items_in_batch):
            # a quality gate can reject every sample of a step: the loss is then 0, not 0/0
            num_items_in_batch = num_items_in_batch.clamp_min(1)

        def objective_loss() -> torch.Tensor:
            return self.objective(
                ObjectiveInputs(
                    student=output_head(model, hidden, self.vocab_size),
                    labels=labels[:, 1:][predicts],
                    normaliser=num_items_in_batch,
                    sequence=_sequence_of_positions(inputs, predicts),
                    num_sequences=int(inputs["num_examples"]) if "num_examples" in inputs else len(labels),
                    teacher=self._teacher_targets(model, inputs, predicts),
                    reference=self._frozen_head(self.reference, input_ids, layout, predicts),
                    rewards=inputs.get("rewards"),
                    groups=inputs.get("groups"),
                    progress=progress,
                    step=self.state.global_step,
                    chunk_size=self.logit_chunk_size,
                )
            )

        head = causal_lm(model).get_output_embeddings()
        # ZeRO-3 holds the head in pieces outside its module's forward: the loss runs as that forward
        loss = inside_forward(head, objective_loss) if partitioned(head.weight) else objective_loss()
        if counted_globally and self.args.average_tokens_across_devices and self.args.world_size > 1:
            # num_items_in_batch counts the tokens of every process, and DDP averages gradients over
            # processes: scale back so that the result is sum / global tokens.
            loss = loss * self.accelerator.num_processes
        return (loss, None) if return_outputs else loss

    @torch.no_grad()
    def _frozen_head(self, model, input_ids, layout: dict, predicts) -> Head | None:
        if model is None:
            return None
        # no cache: with one, transformers would not read packed position ids as separate examples
        decoder = causal_lm(model).get_decoder()
        hidden = decoder(input_ids=input_ids, **layout, use_cache=False).last_hidden_state
        return output_head(model, hidden[:, :-1][predicts], self.vocab_size)

    def _teacher_targets(self, model, inputs, predicts) -> Head | SparseTargets | None:
        if "teacher_topk_ids" in inputs:
            # row j of the stored or served arrays describes token j, like labels[j]
            return SparseTargets(
                inputs["teacher_topk_ids"][:, 1:][predicts],
                inputs["teacher_topk_logprobs"][:, 1:][predicts].float(),
                inputs["teacher_tail_logprob"][:, 1:][predicts].float(),
                inputs["teacher_token_logprob"][:, 1:][predicts].float(),
            )
        teacher = model if self.teacher_is_student else self.teacher
        if "teacher_input_ids" in inputs:
            # the teacher reads its own (privileged) prompt before the same completion tokens, row by
            # row in the same order, so its completion positions pair up with the student's
            teacher_predicts = inputs["teacher_labels"][:, 1:] != IGNORE_INDEX
            layout = {"attention_mask": inputs["teacher_attention_mask"]}
            return self._frozen_head(teacher, inputs["teacher_input_ids"], layout, teacher_predicts)
        return self._frozen_head(teacher, inputs["input_ids"], batch_layout(inputs), predicts)


def batch_layout(inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """How the rows of a batch hold their examples: padded (attention mask) or packed (position ids)."""
    if "position_ids" in inputs:
        return {"position_ids": inputs["position_ids"]}
    return {"attention_mask": inputs["attention_mask"]}


def _sequence_of_positions(inputs: Mapping[str, torch.Tensor], predicts: torch.Tensor) -> torch.Tensor:
    """The example each predicting position belongs to: its row, or its place in a packed row."""
    if "example_ids" in inputs:
        return inputs["example_ids"][:, :-1][predicts]  # position t predicts t + 1 of the same example
    return predicts.nonzero()[:, 0]


OBJECTIVE_STATE = "objective_state.json"  # in each checkpoint folder, beside the Trainer's own state


class ObjectiveStateCallback(TrainerCallback):
    """Writes the objective's state into every checkpoint the Trainer saves (process 0; every process
    holds the same state), so that a resumed run continues the objective's schedule exactly."""

    def __init__(self, objective: Objective):
        self.objective = objective

    def on_save(self, args, state, control, **kwargs):
        state_dict = self.objective.state_dict()
        if state_dict and state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            (folder / OBJECTIVE_STATE).write_text(json.dumps(state_dict))


def _precision_flags(precision: str) -> dict[str, bool]:
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}


@dataclass(frozen=True)
class Efficiency:
    """How a run trains faster or in less memory, without changing what it computes."""

    packing: bool = False  # a micro-batch's examples in one row, unpadded (CompletionCollator.packed_batch)
    gradient_checkpointing: bool = False  # the Trainer's: the student's activations recomputed in backward
    torch_compile: bool = False  # the Trainer's: torch.compile of the student

    def check(self, objective: Objective, on_policy: OnPolicyOptions | None, description: str) -> None:
        """Packing needs examples that are independent token sequences: not pairs, not the student's
        own samples, not objectives that choose or corrupt tokens per row."""
        if not self.packing:
            return
        if objective.data == "pairs":
            what = "pairs"
        elif on_policy is not None:
            what = "on-policy samples"
        elif (
            type(objective).select_labels is not Objective.select_labels
            or type(objective).corrupt_inputs is not Objective.corrupt_inputs
        ):
            what = f"objective {objective.name!r}, which chooses or corrupts tokens row by row"
        else:
            return
        raise UserError(f"{description}: packing packs independent examples; it does not apply to {what}")


@dataclass
class Teachers:
    """What a training run distils from, besides its data."""

    model: Path | str | None = None  # online teacher run on the same token ids, or TEACHER_SELF
    stored: StoredTeacher | None = None  # offline top-k of the examples' completions
    reference: Path | str | None = None  # frozen reference policy (DPO, AdaSPEC); default: init
    scorer: Generator | None = None  # served teacher (on-policy): top-k of the samples via its scoring API
    scorer_top_k: int = 20

    @property
    def given(self) -> bool:
        return self.model is not None or self.stored is not None or self.scorer is not None


def _model_dtype(flags: dict[str, bool]) -> torch.dtype:
    return torch.bfloat16 if flags["bf16"] else torch.float16 if flags["fp16"] else torch.float32


def _build_dataset(
    objective: Objective,
    tokenizer,
    examples: Sequence[TrainingExample] | Sequence[PairExample],
    hp: Hyperparameters,
    teachers: Teachers,
    description: str,
    shared: SharedTokenIds,
    teacher_rows: Path,
) -> tuple[Dataset, TeacherRows | None, dict, int]:
    """(dataset, stored teacher rows, truncation statistics, completion tokens); the stored teacher's
    rows are laid out in the file `teacher_rows`."""
    wanted = PairExample if objective.data == "pairs" else TrainingExample
    if not all(isinstance(e, wanted) for e in examples):
        raise UserError(
            f"{description}: objective {objective.name} trains on "
            f"{'pairs (curate with pairs: true)' if wanted is PairExample else 'single completions, not pairs'}"
        )
    if wanted is PairExample:
        if teachers.stored is not None:
            raise UserError(
                f"{description}: stored teacher log-probabilities are for single completions, not pairs"
            )
        pairs = tokenize_pairs(tokenizer, examples, hp.max_length, shared)
        too_long = [i for i, (c, r) in enumerate(pairs) if c.truncated or r.truncated]
        truncation = truncation_stats(
            examples, [max(c.full_length, r.full_length) for c, r in pairs], too_long, hp
        )
        if hp.truncation == "drop":
            pairs = _without(pairs, too_long)
        rows = [
            {
                "chosen_input_ids": c.input_ids,
                "chosen_labels": c.labels,
                "rejected_input_ids": r.input_ids,
                "rejected_labels": r.labels,
                "length": max(len(c.input_ids), len(r.input_ids)),
            }
            for c, r in pairs
        ]
        tokenized = [t for pair in pairs for t in pair]
        stored_rows = None
    else:
        tokenized = tokenize_examples(tokenizer, examples, hp.max_length, shared)
        too_long = [i for i, t in enumerate(tokenized) if t.truncated]
        truncation = truncation_stats(examples, [t.full_length for t in tokenized], too_long, hp)
        if hp.truncation == "drop":
            examples, tokenized = _without(examples, too_long), _without(tokenized, too_long)
        rows = [
            {"input_ids": t.input_ids, "labels": t.labels, "length": len(t.input_ids), "index": i}
            for i, t in enumerate(tokenized)
        ]
        stored_rows = None
        if teachers.stored is not None:
            on_main(
                lambda: write_teacher_rows(examples, tokenized, teachers.stored, teacher_rows),
                "reading the stored teacher",
            )
            stored_rows = TeacherRows(teacher_rows)
    if not rows:
        raise UserError(
            f"{description}: all {truncation['dropped']} examples are longer than max_length={hp.max_length} and "
            "truncation is drop: raise max_length"
        )
    completion_tokens = sum(int((t.labels != IGNORE_INDEX).sum()) for t in tokenized)
    return Dataset.from_list(rows), stored_rows, truncation, completion_tokens


def _without(items: list, positions: list[int]) -> list:
    leave_out = set(positions)
    return [item for i, item in enumerate(items) if i not in leave_out]


def truncation_stats(
    examples: Sequence, lengths: list[int], too_long: list[int], hp: Hyperparameters
) -> dict:
    """How many examples exceed max_length, how many of their tokens lie beyond it (what a cut loses:
    the completion's end), and what happened to them, naming the first few."""
    named = [
        f"{examples[i].problem_id}"
        + (
            f" sample {examples[i].sample_idx}"
            if getattr(examples[i], "sample_idx", None) is not None
            else ""
        )
        + f" ({lengths[i]} tokens)"
        for i in too_long[:5]
    ]
    return {
        "max_length": hp.max_length,
        "mode": hp.truncation,
        "longer_than_max_length": len(too_long),
        "tokens_beyond_max_length": sum(lengths[i] - hp.max_length for i in too_long),
        "completion_end_cut": len(too_long) if hp.truncation == "cut" else 0,
        "dropped": len(too_long) if hp.truncation == "drop" else 0,
        "first": named,
    }


def warn_beyond_positions(init: str | Path, max_length: int, description: str) -> None:
    """Warn when max_length allows sequences longer than the model has positions for."""
    positions = getattr(load_config(init).get_text_config(), "max_position_embeddings", None)
    if positions is not None and max_length > positions:
        log.warning(
            "%s: max_length=%d exceeds the %d positions of %s: sequences longer than %d are beyond what "
            "the model was built for; set max_length to at most %d",
            description, max_length, positions, init, positions, positions,
        )  # fmt: skip


def warn_truncation(truncation: dict, examples: int, description: str) -> None:
    """One warning per step saying how many examples lost the end of their completion (or were dropped)."""
    n = truncation["longer_than_max_length"]
    if not n:
        return
    what = (
        "were cut: their completions lost their end (final answer and end-of-turn token) and are trained "
        "on so; set truncation: drop to leave them out"
        if truncation["mode"] == "cut"
        else "were dropped"
    )
    log.warning(
        "%s: %d of %d examples are longer than max_length=%d and %s (e.g. %s)",
        description, n, examples, truncation["max_length"], what, ", ".join(truncation["first"]),
    )  # fmt: skip


@dataclass
class _TrainingData:
    """What the Trainer iterates over, and what the statistics report about it."""

    dataset: Dataset
    collator: Callable
    stored_rows: TeacherRows | None = None  # stored teacher top-k, row by row of `dataset`
    truncation: dict | None = None  # on-policy: samples are cut to fit as they are drawn
    completion_tokens: int | None = None
    step_batches: StepBatches | None = None  # on-policy: the student's samples, step by step


def train_model(
    init: Path,
    examples: Sequence[TrainingExample] | Sequence[PairExample],
    output_dir: Path,
    hp: Hyperparameters,
    *,
    teachers: Teachers | None = None,
    on_policy: OnPolicyOptions | None = None,
    problems: Mapping[str, Problem] | None = None,
    grader_for: Callable[[str], Grader] = default_grader,
    description: str = "train",
    resume_key: str = "",
    report_to: Sequence[str] = (),
    logging_dir: Path | None = None,
    lora: LoraOptions | None = None,
    efficiency: Efficiency = Efficiency(),
) -> dict:
    """Train the model at `init` on `examples` and save it (with its tokenizer) to `output_dir`.

    An interrupted run resumes from the newest checkpoint in `.<output_dir>.work` if that was made
    with the same `resume_key` (the step fingerprint), and starts afresh otherwise; the finished
    model appears at `output_dir` atomically. Returns training statistics. `report_to` names
    experiment trackers (as transformers does); tensorboard's event files go to `logging_dir`
    (default: `<output_dir>.tensorboard`). With `lora` the student trains low-rank adapters only and
    is saved as an adapter folder, or merged (see lora.py).

    With `on_policy` the examples are prompts the student answers itself (their completions serve
    the off-policy steps, if any); `problems` (by id) grade those answers with `grader_for(task)`.
    """
    teachers = teachers or Teachers()
    objective = build_objective(hp.objective_spec)
    _check_inputs(objective, examples, teachers, on_policy, description)
    check_sharding(hp.trainer_args, os.environ, description)
    efficiency.check(objective, on_policy, description)
    tokenizer = load_tokenizer(init)
    if lora is not None:
        check_targets(lora, init, description)
    warn_beyond_positions(init, hp.max_length, description)
    template = _check_reasoning_template(tokenizer, teachers, description)
    objective.setup(tokenizer)
    # process 0 tokenizes and the others read its token ids; the folder goes when training ends
    shared = SharedTokenIds(output_dir.with_name(f".{output_dir.name}.tokens"))
    # process 0 lays out the stored teacher's rows there and every process maps them, until the end
    teacher_dir = output_dir.with_name(f".{output_dir.name}.teacher")
    try:
        try:
            if on_policy is None:
                data = _example_data(
                    objective, tokenizer, examples, hp, teachers, description, shared,
                    teacher_dir / "rows.arrow", efficiency.packing,
                )  # fmt: skip
            else:
                data = _on_policy_data(
                    objective, tokenizer, examples, hp, teachers, on_policy, problems, grader_for,
                    description, shared,
                )  # fmt: skip
        finally:
            on_main(lambda: shutil.rmtree(shared.folder, ignore_errors=True), "removing the token ids")
        work_dir = output_dir.with_name(f".{output_dir.name}.work")
        args = _training_arguments(hp, work_dir, description, list(report_to), efficiency)
        model = load_causal_lm(
            init, **loading_kwargs(hp.dtype, hp.attn_implementation, args.device), **quantized_loading(lora)
        )
        frozen, vocab_size = _load_frozen(init, model, tokenizer, objective, teachers, args.device, hp)
        if lora is not None:
            model = with_lora(model, lora, hp.seed)
        vocab_size = _served_vocabulary(tokenizer, teachers.scorer, head_rows(model), vocab_size, description)
        _check_stored_ids(data.stored_rows, vocab_size, teachers.stored)
        # teachers are checked and loaded before a work folder exists: a refused run leaves nothing behind
        on_main(lambda: _open_work_dir(work_dir, resume_key, description), "opening the checkpoint folder")
        trainer = DistillationTrainer(
            model=model,
            args=args,
            train_dataset=data.dataset,
            data_collator=data.collator,
            processing_class=tokenizer,
            objective=objective,
            teacher=frozen.get("teacher"),
            reference=frozen.get("reference"),
            vocab_size=vocab_size,
            logit_chunk_size=hp.logit_chunk_size,
            sort_within_step=hp.sort_within_step and on_policy is None,
            teacher_is_student=teachers.model == TEACHER_SELF,
            step_batches=data.step_batches,
            callbacks=tracker_callbacks(
                report_to, logging_dir or output_dir.with_name(f"{output_dir.name}.tensorboard"), args
            ),
        )
        result = _train(trainer, work_dir, data.step_batches, description)
        stats = {
            **_training_stats(init, model, hp, objective, data, trainer, result),
            "reasoning_template": template,
        }
        if lora is not None:
            stats["lora"] = {**lora.model_dump(), "trainable_parameters": trainable_parameters(model)}
        _save_atomically(trainer, tokenizer, stats, output_dir, work_dir, lora, init)
        return stats
    finally:
        if is_main():  # a map keeps what it holds after the file goes: nobody needs to wait for this
            shutil.rmtree(teacher_dir, ignore_errors=True)


def _check_reasoning_template(tokenizer, teachers: Teachers, description: str) -> dict:
    """`chat.reasoning_preflight` of the student (and of the teacher it distils from token by token):
    differences are warned about, a template that would train completions without their reasoning
    block is refused; what it found goes into the training statistics."""
    online = teachers.model if teachers.model not in (None, TEACHER_SELF) else None
    teacher = load_tokenizer(online) if online is not None else getattr(teachers.scorer, "tokenizer", None)
    check = reasoning_preflight(tokenizer, teacher)
    if not check.trained_keeps_reasoning:
        raise UserError(
            f"{description}: the student's chat template and tokenizer do not keep a completion's reasoning "
            f"block when it is tokenized for training (opener {check.opener!r}, tokens {check.think_tokens})"
        )
    for difference in check.differences:
        log.warning("%s: %s", description, difference)
    return check.as_stats()


def _check_inputs(
    objective: Objective,
    examples: Sequence,
    teachers: Teachers,
    on_policy: OnPolicyOptions | None,
    description: str,
) -> None:
    """Refuse a run whose teacher, reference or on-policy options do not fit its objective, or without data."""
    problem = missing_inputs(objective, teachers.given, teachers.reference is not None) or on_policy_problem(
        objective, on_policy, teachers.model == TEACHER_SELF
    )
    if problem:
        raise UserError(f"{description}: {problem}")
    if not examples:
        raise UserError(f"{description}: no training examples")


def _example_data(
    objective: Objective,
    tokenizer,
    examples: Sequence[TrainingExample] | Sequence[PairExample],
    hp: Hyperparameters,
    teachers: Teachers,
    description: str,
    shared: SharedTokenIds,
    teacher_rows: Path,
    packed: bool = False,
) -> _TrainingData:
    """Off-policy: the examples' own completions, tokenized, with their stored teacher rows if any
    (laid out in the file `teacher_rows`)."""
    dataset, stored_rows, truncation, completion_tokens = _build_dataset(
        objective, tokenizer, examples, hp, teachers, description, shared, teacher_rows
    )
    warn_truncation(truncation, len(examples), description)
    collator = CompletionCollator(tokenizer.pad_token_id, objective, stored_rows, packed)
    return _TrainingData(dataset, collator, stored_rows, truncation, completion_tokens)


def _on_policy_data(
    objective: Objective,
    tokenizer,
    examples: Sequence[TrainingExample],
    hp: Hyperparameters,
    teachers: Teachers,
    on_policy: OnPolicyOptions,
    problems: Mapping[str, Problem] | None,
    grader_for: Callable[[str], Grader],
    description: str,
    shared: SharedTokenIds,
) -> _TrainingData:
    """On-policy: prompt indices; each step's batches are rebuilt from the student's samples."""
    if teachers.stored is not None:
        raise UserError(
            f"{description}: stored teacher log-probabilities describe the data's completions, not the "
            "student's samples: use an online or served teacher on-policy"
        )
    rows = prompt_rows(tokenizer, examples, problems, on_policy, objective.needs_rewards, description, shared)
    step_batches = StepBatches(
        rows, on_policy, tokenizer, hp.max_length, hp.seed, grader_for, teachers.scorer, teachers.scorer_top_k
    )
    dataset = Dataset.from_list([{"index": i} for i in range(len(rows))])
    return _TrainingData(dataset, collate_indices, step_batches=step_batches)


def _training_arguments(
    hp: Hyperparameters,
    work_dir: Path,
    description: str,
    report_to: list[str],
    efficiency: Efficiency = Efficiency(),
) -> TrainingArguments:
    """The Trainer's arguments: ours from the hyperparameters, plus `trainer_args` that do not override them."""
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
        # tensorboard goes through our own callback (tracker_callbacks), to a folder that outlives the run
        report_to=[
            tracker for tracker in _checked_trackers(report_to, description) if tracker != "tensorboard"
        ],
        run_name=description,
        remove_unused_columns=False,
        dataloader_pin_memory=torch.cuda.is_available(),
        use_cpu=cpu_processes(),  # several CPU processes: one gloo group, not N runs of one
        gradient_checkpointing=efficiency.gradient_checkpointing,
        torch_compile=efficiency.torch_compile,
        **_precision_flags(hp.precision),
    )
    duplicated = sorted(ours.keys() & hp.trainer_args.keys())
    if duplicated:
        raise UserError(
            f"{description}: trainer_args.{duplicated[0]} is set by reasondistill; use its own option instead"
        )
    try:
        return TrainingArguments(**ours, **hp.trainer_args)
    except (TypeError, ValueError) as err:
        raise UserError(f"{description}: invalid training arguments: {err}") from None


def _checked_trackers(report_to: list[str], description: str) -> list[str]:
    """`report_to`, refused in one line (before any weights load) if it names a tracker transformers
    does not know or one that is not installed."""
    from transformers.integrations.integration_utils import (
        INTEGRATION_TO_CALLBACK,
        get_available_reporting_integrations,
    )

    for tracker in report_to:
        if tracker not in INTEGRATION_TO_CALLBACK:
            raise UserError(
                f"{description}: report_to: unknown tracker {tracker!r}; transformers knows "
                f"{', '.join(INTEGRATION_TO_CALLBACK)}"
            )
        if tracker not in get_available_reporting_integrations():
            raise UserError(f"{description}: report_to: {tracker} is not installed (pip install {tracker})")
    return report_to


def tracker_callbacks(
    report_to: Sequence[str], logging_dir: Path, args: TrainingArguments
) -> list[TrainerCallback]:
    """Callbacks the Trainer does not make itself: tensorboard's, writing to `logging_dir` (the
    Trainer's own would write into the work folder, which goes when training ends), on process 0
    only (the others log nothing, and would leave empty event files)."""
    if "tensorboard" not in report_to or args.process_index != 0:
        return []
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    return [TensorBoardCallback(SummaryWriter(log_dir=str(logging_dir)))]


def _load_frozen(
    init: Path,
    model: torch.nn.Module,
    tokenizer,
    objective: Objective,
    teachers: Teachers,
    device: torch.device,
    hp: Hyperparameters,
) -> tuple[dict[str, torch.nn.Module], int]:
    """The frozen teacher and reference (by role) beside the student, and the vocabulary rows they all share.

    Each is checked against the student's tokenizer before its weights load (see teachers.py); the
    reference defaults to the init weights for objectives that need one.
    """
    vocab_size, frozen = head_rows(model), {}
    reference = teachers.reference or (init if objective.needs_reference else None)
    dtype = _model_dtype(_precision_flags(hp.precision))
    for role, path in (("teacher", teachers.model), ("reference", reference)):
        if path is not None and path != TEACHER_SELF:
            frozen[role], shared = load_beside_student(
                path, tokenizer, head_rows(model), device, dtype, hp.attn_implementation
            )
            vocab_size = min(vocab_size, shared)
    return frozen, vocab_size


def _served_vocabulary(
    tokenizer, scorer: Generator | None, student_rows: int, vocab_size: int, description: str
) -> int:
    """`vocab_size`, narrowed to the rows a served teacher shares with the student after its pre-flight check."""
    if scorer is None:
        return vocab_size
    served_tokenizer = getattr(scorer, "tokenizer", None)
    if served_tokenizer is None:
        raise UserError(
            f"{description}: the served teacher needs `tokenizer` (its tokenizer folder or Hub id) to "
            "check that it numbers tokens as the student does"
        )
    return min(
        vocab_size, preflight(tokenizer, served_tokenizer, student_rows, len(served_tokenizer), "server")
    )


def _check_stored_ids(stored_rows: TeacherRows | None, vocab_size: int, stored: StoredTeacher | None) -> None:
    """Refuse stored teacher distributions naming tokens beyond the vocabulary shared with the student."""
    if stored_rows is not None and stored_rows.max_id >= vocab_size:
        raise UserError(
            f"{stored.source}: stored token ids exceed the student's {vocab_size} vocabulary rows"
        )


def _open_work_dir(work_dir: Path, resume_key: str, description: str) -> None:
    """The checkpoint folder, keeping the checkpoints of an interrupted run only if it had the same key."""
    key_file = work_dir / "resume_key"
    if work_dir.is_dir() and (not key_file.exists() or key_file.read_text() != resume_key):
        log.info("%s: discarding checkpoints of an unfinished run with other settings", description)
        shutil.rmtree(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    key_file.write_text(resume_key)


def _train(trainer: DistillationTrainer, work_dir: Path, step_batches: StepBatches | None, description: str):
    """Train from the newest checkpoint in `work_dir`, if any; the on-policy sampler is closed either way."""
    resume_from = get_last_checkpoint(str(work_dir))
    if resume_from:
        log.info("%s: resuming from %s", description, resume_from)
        trainer.restore_objective_state(resume_from)
    try:
        return trainer.train(resume_from_checkpoint=resume_from)
    finally:
        if step_batches is not None:
            step_batches.close()


def _training_stats(
    init: Path,
    model: torch.nn.Module,
    hp: Hyperparameters,
    objective: Objective,
    data: _TrainingData,
    trainer: DistillationTrainer,
    result,
) -> dict:
    """What the run did, saved beside the model as training_stats.json and recorded with the step."""
    stats = {
        "init": str(init),
        "objective": {"name": hp.objective, **objective.model_dump()},
        "examples": len(data.dataset),
        "truncation": data.truncation,
        "completion_tokens": data.completion_tokens,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),  # of the saved weights
        "steps": trainer.state.global_step,
        "processes": trainer.args.world_size,
        "packing": isinstance(data.collator, CompletionCollator) and data.collator.packed,
        "train_loss": result.training_loss,
        "seconds": result.metrics.get("train_runtime"),
        "parameters": sum(p.numel() for p in model.parameters()),  # the student as loaded, not as wrapped
        "objective_state": objective.state_dict(),  # at the end (TAID's t)
        "loss_curve": [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e],
    }
    if data.step_batches is not None:  # each process sampled its share of every step's prompts
        stats["on_policy"] = on_policy_stats(merged_history(gather_object(data.step_batches.history)))
    return stats


def _save_atomically(
    trainer: DistillationTrainer,
    tokenizer,
    stats: dict,
    output_dir: Path,
    work_dir: Path,
    lora: LoraOptions | None = None,
    init: Path | str = "",
) -> None:
    """Write model, tokenizer and stats beside `output_dir`, then rename into place and drop the checkpoints.
    LoRA: the adapter (naming its base by absolute path when the base is a folder), or merged weights.

    Every process takes part in saving the model (a sharded model is gathered for it); process 0
    writes, and the others wait until the model is in place."""
    staging = output_dir.with_name(f".{output_dir.name}.final")
    on_main(lambda: shutil.rmtree(staging, ignore_errors=True), "clearing the staging folder")
    if lora is not None and lora.merge:
        if trainer.args.should_save:
            trainer.accelerator.unwrap_model(trainer.model).merge_and_unload().save_pretrained(str(staging))
    else:
        if lora is not None and Path(init).is_dir():
            config = trainer.accelerator.unwrap_model(trainer.model).peft_config["default"]
            config.base_model_name_or_path = str(Path(init).resolve())
        trainer.save_model(str(staging))

    def put_in_place() -> None:
        tokenizer.save_pretrained(str(staging))
        (staging / "training_stats.json").write_text(json.dumps(stats, indent=2))
        shutil.rmtree(output_dir, ignore_errors=True)
        staging.rename(output_dir)
        shutil.rmtree(work_dir, ignore_errors=True)

    on_main(put_in_place, "saving the model")
