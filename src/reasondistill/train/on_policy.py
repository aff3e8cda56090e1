"""On-policy distillation: the student samples, the teacher grades those tokens, an objective learns from them.

Training on teacher text only leaves the student unable to recover from its own mistakes (exposure
bias). Here, at each optimizer step with probability λ (`fraction`, as in GKD), the prompts of all
the step's micro-batches are answered by the student with its current weights, in one generation
call; the micro-batches are then rebuilt from those samples (input = prompt + sampled tokens, loss
on the sampled tokens) and reused across gradient accumulation. The other steps train on the data's
own completions. Every objective of the library applies unchanged to the sampled tokens: a
divergence against an online teacher is GKD; `reverse_kl_pg`, `grpo` and `kdrl` are the
policy-gradient forms; a quality gate keeps only samples the verifier accepts (KEPO).

The teacher is an online model run on the sampled tokens inside the loss, the student itself
(`self`: OPSD's current-weights teacher), or a served teacher (hf, vLLM or an OpenAI-compatible
server) whose top-k over the sampled tokens comes back through the backends' scoring API. With
`teacher_context` the teacher reads a prompt that holds the problem's verified gold solution (OPSD).
Samples are seeded by (seed, step, prompt), so a resumed run draws the same ones, and so does a job
of several processes (each samples its share of the step's prompts). The options and
their check against an objective are in on_policy_options.py (light: the train stage's config holds them).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..chat import completion_ids, prompt_ids, reasoning_opener
from ..errors import UserError
from ..generate.base import Failure, Generator, row_seed, whole_replies
from ..generate.hf import HFGenerator
from ..generate.logprobs import TokenLogprobs
from ..objectives.base import IGNORE_INDEX
from ..records import Message, Problem, TrainingExample
from ..verify.graders import Grader
from .data import TOKENIZE_HERE, SharedTokenIds, SparseTeacherRows, sparse_teacher_batch
from .on_policy_options import OnPolicyOptions
from .teachers import causal_lm

if TYPE_CHECKING:
    from ..generate.vllm import VLLMGenerator


@dataclass
class PromptRow:
    """One training prompt: what the student reads, what the teacher reads, and how to grade an answer."""

    example: TrainingExample
    problem: Problem | None
    prompt_ids: list[int]
    completion_ids: list[int]  # the data's completion, for the off-policy steps
    teacher_prompt_ids: list[int] | None  # the privileged prompt (OPSD), else None: the student's


def prompt_rows(
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[TrainingExample],
    problems: Mapping[str, Problem] | None,
    options: OnPolicyOptions,
    needs_rewards: bool,
    description: str,
    shared: SharedTokenIds = TOKENIZE_HERE,
) -> list[PromptRow]:
    """The examples as prompts, joined with their problems (to grade samples, and for the teacher's context).

    Samples are graded whenever problems are given; rewards, the gate and teacher_context need them.
    `shared` tokenizes once per job.
    """
    template = options.context_template()
    if problems is None and (needs_rewards or options.gate != "none" or template):
        raise UserError(
            f"{description}: rewards, on_policy.gate and teacher_context need the problems to grade against"
        )
    joined = []
    for row, example in enumerate(examples):
        problem = None if problems is None else problems.get(example.problem_id)
        if problems is not None and problem is None:
            raise UserError(
                f"{description}: example {row}: problem_id {example.problem_id!r} is not a known problem"
            )
        joined.append(problem)
    prompts = shared("prompts", lambda: prompt_ids(tokenizer, [e.messages for e in examples]))
    completions = shared("completions", lambda: completion_ids(tokenizer, [e.completion for e in examples]))
    teacher_prompts: list[list[int] | None] = [None] * len(examples)
    if template:
        privileged = [privileged_messages(p, template, description) for p in joined]
        teacher_prompts = shared("teacher-prompts", lambda: prompt_ids(tokenizer, privileged))
    return [
        PromptRow(*fields)
        for fields in zip(examples, joined, prompts, completions, teacher_prompts, strict=True)
    ]


def privileged_messages(problem: Problem, template: str, description: str) -> list[Message]:
    """The problem's messages with the last user turn rewritten to hold its gold solution."""
    if not problem.solution:
        raise UserError(f"{description}: problem {problem.id!r} has no gold solution for teacher_context")
    *earlier, last = problem.messages
    content = template.format(problem=last.content, solution=problem.solution)
    return [*earlier, Message(role=last.role, content=content)]


@dataclass
class Sample:
    """One sequence of a step: a prompt row and the completion tokens trained on."""

    row: PromptRow
    group: int  # index of the prompt within the step: samples of one prompt form a GRPO group
    token_ids: list[int]
    text: str
    finish_reason: str
    reward: float | None = None  # 1 if the verifier accepts the completion, else 0; None: no problem to grade


class StepBatches:
    """Builds each optimizer step's micro-batches from the prompts the data loader drew for it.

    Called by `DistillationTrainer.get_batch_samples` with the step's collated micro-batches (which
    hold only `index` into `rows`); returns the micro-batches to train on, each holding the samples
    of its own prompts, so a GRPO group never straddles two micro-batches.
    """

    def __init__(
        self,
        rows: Sequence[PromptRow],
        options: OnPolicyOptions,
        tokenizer: PreTrainedTokenizerBase,
        max_length: int,
        seed: int,
        grader_for: Callable[[str], Grader],
        scorer: Generator | None = None,
        scorer_top_k: int = 0,
    ):
        self.rows, self.options, self.max_length, self.seed = rows, options, max_length, seed
        self.grader_for = grader_for
        self.scorer, self.scorer_top_k = scorer, scorer_top_k
        self.pad_token_id = tokenizer.pad_token_id
        self.sampler: HFGenerator | VLLMGenerator | None = None
        self.tokenizer = tokenizer
        self.history: list[dict] = []  # one entry per optimizer step: what was trained on
        self._logged = 0  # history entries already summarised in a log line

    def close(self) -> None:
        """Release a vLLM sampler's engine (an hf sampler is the training model itself)."""
        if self.options.sampler == "vllm" and self.sampler is not None:
            self.sampler.close()

    def recent_metrics(self) -> dict[str, float]:
        """Means over the steps since the last log line, for the Trainer's logs."""
        recent, self._logged = self.history[self._logged :], len(self.history)
        sampled = [h for h in recent if h["on_policy"]]
        if not sampled:
            return {}
        metrics = {
            "sample_tokens": _mean([h["mean_tokens"] for h in sampled]),
            "kept_share": sum(h["kept"] for h in sampled) / sum(h["samples"] for h in sampled),
        }
        rewards = [h["mean_reward"] for h in sampled if h["mean_reward"] is not None]
        if rewards:
            metrics["sample_reward"] = _mean(rewards)
        return metrics

    def __call__(self, trainer, batches: list[dict]) -> list[dict]:
        step = trainer.state.global_step
        indices = [batch["index"].tolist() for batch in batches]
        rows = [self.rows[i] for micro in indices for i in micro]
        # the same decision on every process: ranks must agree on what the step trains on
        on_policy = random.Random(f"{self.seed}/{step}").random() < self.options.fraction
        started = time.perf_counter()
        if on_policy:
            # each prompt's samples are seeded by (seed, step, prompt): the same on any number of processes
            seeds = [row_seed(self.seed, f"on-policy step {step}", i) for micro in indices for i in micro]
            samples = self._sample(trainer.model, rows, self.seed * 1_000_003 + step, seeds)
        else:
            samples = [
                Sample(row, g, row.completion_ids, row.example.completion, "stop")
                for g, row in enumerate(rows)
            ]
        sampled = time.perf_counter()
        for sample in samples:
            if sample.row.problem is not None:
                sample.reward = self._reward(sample)
        teacher = self._served_teacher(samples)
        scored = time.perf_counter()
        per_row = len(samples) // len(rows)
        built, start = [], 0
        for micro in indices:
            count = len(micro) * per_row
            built.append(
                self._batch(
                    samples[start : start + count], teacher[start : start + count] if teacher else None
                )
            )
            start += count
        self.history.append(
            {
                "step": step,
                "on_policy": on_policy,
                "samples": len(samples),
                "mean_reward": _mean([s.reward for s in samples if s.reward is not None]),
                "kept": sum(self._kept(s) for s in samples),
                "mean_tokens": float(np.mean([len(s.token_ids) for s in samples])),
                "sample_seconds": sampled - started,
                "score_seconds": scored - sampled,
            }
        )
        return built

    # ---- the pieces of a step -----------------------------------------------------------------
    def _sample(
        self, model: torch.nn.Module, rows: list[PromptRow], seed: int, seeds: list[int]
    ) -> list[Sample]:
        """`samples_per_prompt` completions per row from the current weights (the live training model),
        row i's drawn with `seeds[i]`."""
        model = causal_lm(model)
        prompts, sampling = [r.prompt_ids for r in rows], self.options.sampling(seed)
        if self.options.sampler == "vllm":
            completions = self._vllm_sampler(model).generate_ids(prompts, sampling, seeds=seeds)
        else:
            if self.sampler is None:
                self.sampler = HFGenerator.around(model, self.tokenizer, compile=self.options.compile)
            self.sampler.model = model
            self.sampler.batch_size = len(prompts) * sampling.n  # the whole step in one generate call
            was_training = model.training
            model.eval()  # no dropout while sampling: the samples come from the policy being trained
            try:
                completions = self.sampler.generate_ids(prompts, sampling, seeds=seeds)
            finally:
                model.train(was_training)
        completions = whole_replies(completions, reasoning_opener(self.tokenizer))  # graded as whole replies
        samples = []
        for group, (row, row_completions) in enumerate(zip(rows, completions, strict=True)):
            for c in row_completions:
                if isinstance(c, Failure):
                    raise UserError(f"sampling problem {row.example.problem_id!r} failed: {c.error}")
                samples.append(Sample(row, group, c.token_ids, c.text, c.finish_reason))
        return samples

    def _vllm_sampler(self, model: PreTrainedModel) -> VLLMGenerator:
        """The colocated vLLM engine, holding the training model's current weights."""
        if self.sampler is None:
            from ..generate.vllm import VLLMGenerator

            self.sampler = VLLMGenerator(
                model.config.name_or_path,
                gpu_memory_utilization=self.options.vllm_gpu_memory_utilization,
                colocate=True,
            )
        self.sampler.load_weights(model.named_parameters())
        return self.sampler

    def _reward(self, sample: Sample) -> float:
        problem = sample.row.problem
        verdict = self.grader_for(problem.task).grade(sample.text, problem, sample.finish_reason)
        return float(verdict.label == "correct")

    def _kept(self, sample: Sample) -> bool:
        return self.options.gate == "none" or sample.reward == 1.0

    def _teacher_prompt(self, sample: Sample) -> list[int]:
        return sample.row.teacher_prompt_ids or sample.row.prompt_ids

    def _served_teacher(self, samples: list[Sample]) -> list[TokenLogprobs] | None:
        """The served teacher's top-k at every sampled token, in one scoring call for the step."""
        if self.scorer is None:
            return None
        scored = self.scorer.score_ids(
            [self._teacher_prompt(s) for s in samples], [s.token_ids for s in samples], self.scorer_top_k
        )
        for result in scored:
            if isinstance(result, Failure):
                raise UserError(
                    f"the teacher failed to score a sample after {result.attempts} attempts: {result.error}"
                )
        return scored

    def _batch(self, samples: list[Sample], teacher: list[TokenLogprobs] | None) -> dict[str, torch.Tensor]:
        """Right-padded prompt + completion ids; labels on the kept samples' completion tokens only.

        A completion is cut to fit max_length after the longer of its two prompts (the student's and
        the teacher's privileged one), so both read the same completion tokens.
        """
        completions = [
            s.token_ids[: self.max_length - max(len(s.row.prompt_ids), len(self._teacher_prompt(s)))]
            for s in samples
        ]
        if any(not c for c in completions):
            raise UserError(
                f"a prompt fills max_length={self.max_length}: raise max_length or shorten the prompt"
            )
        kept = [self._kept(s) for s in samples]
        prompts = [s.row.prompt_ids for s in samples]
        batch = _padded(prompts, completions, kept, self.pad_token_id)
        batch["rewards"] = torch.tensor([s.reward if s.reward is not None else float("nan") for s in samples])
        batch["groups"] = torch.tensor([s.group for s in samples])
        if teacher is not None:  # served: it has read the privileged prompts already
            rows = [
                SparseTeacherRows.on_positions(scored, len(prompt), len(completion))
                for scored, prompt, completion in zip(teacher, prompts, completions, strict=True)
            ]
            batch.update(sparse_teacher_batch(rows, batch["input_ids"].shape[1]))
        elif any(s.row.teacher_prompt_ids for s in samples):  # online: it reads them in the loss
            privileged = _padded(
                [self._teacher_prompt(s) for s in samples], completions, kept, self.pad_token_id
            )
            batch.update({f"teacher_{name}": value for name, value in privileged.items()})
        return batch


def _padded(
    prompts: list[list[int]], completions: list[list[int]], kept: list[bool], pad_token_id: int
) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask and labels of prompt + completion rows, right-padded."""
    width = max(len(p) + len(c) for p, c in zip(prompts, completions, strict=True))
    input_ids = torch.full((len(prompts), width), pad_token_id)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    labels = torch.full((len(prompts), width), IGNORE_INDEX)
    for i, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        length = len(prompt) + len(completion)
        input_ids[i, :length] = torch.tensor(prompt + completion)
        attention[i, :length] = 1
        if kept[i]:
            labels[i, len(prompt) : length] = torch.tensor(completion)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def collate_indices(features: list[dict]) -> dict[str, torch.Tensor]:
    """On-policy micro-batches leave the data loader as prompt indices; `StepBatches` builds the rest."""
    return {"index": torch.tensor([f["index"] for f in features])}


def merged_history(entries: list[dict]) -> list[dict]:
    """One history entry per step from the entries of every process (each sampled its share of the
    step's prompts): counts add up, means are weighted by samples, times are the slowest process's."""
    by_step: dict[int, list[dict]] = {}
    for entry in entries:
        by_step.setdefault(entry["step"], []).append(entry)
    merged = []
    for step, parts in sorted(by_step.items()):
        samples = sum(p["samples"] for p in parts)
        graded = [p for p in parts if p["mean_reward"] is not None]
        merged.append(
            {
                "step": step,
                "on_policy": parts[0]["on_policy"],  # decided alike on every process
                "samples": samples,
                "mean_reward": sum(p["mean_reward"] * p["samples"] for p in graded)
                / sum(p["samples"] for p in graded)
                if graded
                else None,
                "kept": sum(p["kept"] for p in parts),
                "mean_tokens": sum(p["mean_tokens"] * p["samples"] for p in parts) / samples,
                "sample_seconds": max(p["sample_seconds"] for p in parts),
                "score_seconds": max(p["score_seconds"] for p in parts),
            }
        )
    return merged


def on_policy_stats(history: list[dict]) -> dict:
    """What the steps of a run trained on: how many were on-policy, the samples' reward and length."""
    sampled = [h for h in history if h["on_policy"]]
    return {
        "on_policy_steps": len(sampled),
        "steps": len(history),
        "samples": sum(h["samples"] for h in history),
        "kept_samples": sum(h["kept"] for h in history),
        "mean_reward": _mean([h["mean_reward"] for h in sampled if h["mean_reward"] is not None]),
        "mean_tokens": float(np.mean([h["mean_tokens"] for h in sampled])) if sampled else None,
        "sample_seconds": sum(h["sample_seconds"] for h in history),
        "score_seconds": sum(h["score_seconds"] for h in history),
        "reward_curve": [(h["step"], h["mean_reward"]) for h in sampled if h["mean_reward"] is not None],
    }


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None
