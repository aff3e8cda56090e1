"""The on-policy options of the train stage and the check of an objective against them (pydantic only:
the train stage's config holds them, and printing its help must not import torch; on_policy.py runs them)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator

from ..config import StageConfig
from ..generate.base import MaxNewTokens, Samples, SamplingParams, Temperature, TopK, TopP

if TYPE_CHECKING:
    from ..objectives import ObjectiveOptions

TEACHER_SELF = "self"  # the teacher is the student's current weights (OPSD)

# OPSD's teacher prompt (siyan-zhao/OPSD): the problem, the verified solution, then the problem again.
OPSD_TEMPLATE = (
    "{problem}\n\nHere is a reference solution to this problem:\n{solution}\n\nAfter understanding the "
    "reference solution and the rationale behind each step, now articulate your own step-by-step "
    "reasoning that derives the same final answer to the problem below:\n\n{problem}"
)


class OnPolicyOptions(StageConfig):
    """`train.on_policy`: train on the student's own samples. The sampling fields and their bounds are
    `SamplingParams`' (see generate/base.py); the seed comes from the run's, per step and process."""

    fraction: float = Field(
        1.0,
        ge=0,
        le=1,
        description="λ: share of optimizer steps on the student's samples (GKD); the rest use the data",
    )
    samples_per_prompt: Samples = Field(1, description="samples per prompt (the group size of grpo / kdrl)")
    temperature: Temperature = Field(
        1.0, description="sampling temperature (1: the student's own distribution)"
    )
    top_p: TopP = 1.0
    top_k: TopK = 0
    max_new_tokens: MaxNewTokens = Field(
        1024, description="sample length limit; cut samples train without an end token"
    )
    sampler: Literal["hf", "vllm"] = Field(
        "hf",
        description="hf: the hf backend's decoding loop on the training model; vllm: a vLLM engine in the "
        "same process (CUDA GPU) that receives the current weights before every sampling step",
    )
    compile: bool = Field(
        False,
        description="hf sampler: decoding steps through torch.compile with dynamic shapes (compiled once, "
        "~10 s for the testbed's student on 2 CPU cores; then ~2x faster sampling there)",
    )
    vllm_gpu_memory_utilization: float = Field(
        0.3, gt=0, lt=1, description="vllm sampler: share of GPU memory for its engine (the rest trains)"
    )
    gate: Literal["none", "correct"] = Field(
        "none",
        description="correct: learn only from samples the verifier accepts (quality-gated distillation)",
    )
    teacher_context: str | None = Field(
        None,
        description="the teacher's user message, with {problem} and {solution} (the verified gold solution): "
        "OPSD's privileged context; `opsd` is the paper's wording",
    )

    @model_validator(mode="after")
    def _compile_on_hf(self) -> OnPolicyOptions:
        if self.compile and self.sampler != "hf":
            raise ValueError("compile: for the hf sampler only (vLLM compiles its own graphs)")
        return self

    def sampling(self, seed: int) -> SamplingParams:
        return SamplingParams(
            n=self.samples_per_prompt,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            max_new_tokens=self.max_new_tokens,
            seed=seed,
        )

    def context_template(self) -> str | None:
        return OPSD_TEMPLATE if self.teacher_context == "opsd" else self.teacher_context


def on_policy_problem(
    objective: ObjectiveOptions, options: OnPolicyOptions | None, teacher_is_student: bool
) -> str | None:
    """What is wrong with training `objective` with these on-policy options, or None."""
    if options is None:
        if objective.on_policy_only:
            return f"objective {objective.name!r} learns from the student's own samples: set on_policy"
        if teacher_is_student:
            return "teacher `self` (the student's current weights) needs on_policy"
        return None
    if objective.data == "pairs":
        return f"objective {objective.name!r} trains on pairs of given completions, not on-policy"
    if objective.on_policy_only and options.fraction < 1:
        return f"objective {objective.name!r} learns from the student's own samples only: set on_policy.fraction 1"
    if objective.needs_rewards and options.samples_per_prompt < 2:
        return (
            f"objective {objective.name!r} compares samples of a prompt: set on_policy.samples_per_prompt ≥ 2"
        )
    if options.teacher_context and not objective.needs_teacher:
        return f"on_policy.teacher_context is the teacher's prompt, and objective {objective.name!r} has no teacher"
    template = options.context_template()
    if template and ("{problem}" not in template or "{solution}" not in template):
        return "on_policy.teacher_context must contain {problem} and {solution}"
    return None
