"""The options of a training run, and what its objective needs besides data.

Light on purpose (pydantic only): stage options, recipes and the testbed's build fingerprint read
these without importing torch or transformers; the trainer (trainer.py) carries them out.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from ..errors import UserError
from ..objectives import ObjectiveOptions, parse_objective


class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    objective: str = Field(
        "sft",
        description="training objective, by name (`reasondistill objectives` lists them with their options)",
    )
    objective_args: dict[str, Any] = Field(
        default_factory=dict,
        description="options of the objective (e.g. beta, temperature; `reasondistill objectives` shows each "
        "objective's options, types and defaults)",
    )
    logit_chunk_size: int = Field(
        512,
        ge=1,
        description="completion positions projected to the vocabulary at a time in the loss, which "
        "sets its memory (at Qwen's 151,936 tokens and 512: 11-15% of a naive forward KL's; see the README)",
    )
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
        4096,
        ge=8,
        description="tokens per example (prompt + completion), sized for reasoning traces; see truncation "
        "for longer ones",
    )
    truncation: Literal["cut", "drop"] = Field(
        "cut",
        description="an example longer than max_length: cut (trained on its first max_length tokens: the "
        "completion loses its end, final answer and end-of-turn token) or drop (left out); counted either way",
    )
    sort_within_step: bool = Field(
        True,
        description="sort each optimizer step's examples by length into its micro-batches: less padding, same update",
    )
    precision: str = Field(
        "auto",
        pattern="^(auto|fp32|bf16|fp16)$",
        description="compute precision (mixed precision; teachers and references run in it): auto: bf16 on "
        "a GPU that has it, else fp32",
    )
    dtype: Literal["float32", "bfloat16", "auto"] = Field(
        "float32",
        description="the student's weights while training and in the saved model: float32 (master weights "
        "under mixed precision, as transformers' Trainer keeps them), bfloat16 (weights, gradients and "
        "optimizer state in bfloat16: less memory, and the model saved in bfloat16), auto (bfloat16 on a "
        "GPU that supports it, else float32). float16 weights do not train with loss scaling: use "
        "precision fp16 with float32 weights",
    )
    attn_implementation: str | None = Field(
        None,
        description="transformers' attention kernel of the student, teacher and reference (sdpa, eager, "
        "flash_attention_2, …); default: transformers' choice",
    )
    save_steps: int = Field(500, ge=1, description="optimizer steps between resumable checkpoints")
    logging_steps: int = Field(10, ge=1, description="optimizer steps between loss log lines")
    seed: int = Field(0, description="seed of the data order")
    trainer_args: dict[str, Any] = Field(
        default_factory=dict, description="extra transformers.TrainingArguments (e.g. deepspeed, fsdp)"
    )

    _objective: ObjectiveOptions = PrivateAttr()

    @model_validator(mode="after")
    def _typed_objective(self) -> Hyperparameters:
        """The objective and its options, validated once into their typed model."""
        try:
            self._objective = parse_objective(self.objective, self.objective_args)
        except UserError as err:
            raise ValueError(str(err)) from None
        return self

    @model_validator(mode="after")
    def _trainable_dtype(self) -> Hyperparameters:
        if self.dtype == "bfloat16" and self.precision == "fp16":
            raise ValueError(
                "dtype bfloat16 with precision fp16: the fp16 loss scaler cannot unscale bfloat16 "
                "gradients; use precision bf16 (or auto), or dtype float32"
            )
        return self

    @property
    def objective_spec(self) -> ObjectiveOptions:
        """The objective's typed options (what `objectives.build_objective` turns into the loss)."""
        return self._objective


def missing_inputs(objective: ObjectiveOptions, has_teacher: bool, has_reference: bool) -> str | None:
    """What is wrong with the teacher / reference given for `objective`, or None."""
    if objective.needs_teacher and not has_teacher:
        return (
            f"objective {objective.name!r} needs a teacher: set teacher (a model) or teacher_logprobs "
            "(stored top-k distributions)"
        )
    if has_teacher and not objective.needs_teacher:
        return f"objective {objective.name!r} does not use a teacher; remove it"
    if objective.needs_reference and not (has_reference or objective.reference_defaults_to_init):
        return f"objective {objective.name!r} needs a reference model: set reference"
    if has_reference and not objective.needs_reference:
        return f"objective {objective.name!r} does not use a reference model; remove it"
    return None
