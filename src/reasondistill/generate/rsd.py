"""Student-gated teacher traces: reverse speculative decoding (RSD, arXiv 2509.22230).

A teacher's traces hold tokens the small student finds very improbable, and these block its
learning more than they teach it. RSD decodes teacher and student together: at each step the
teacher proposes y ~ p_T(·|prefix) with the step's sampling settings, and the student keeps it if
q_S(y|prefix) ≥ τ, measured on its own distribution (temperature 1, no top-k/top-p filter).
Otherwise the student's own token, drawn from q_S with the same sampling settings (argmax when
greedy), takes its place. Both models then read the chosen token, so the trace follows the teacher
wherever the student can follow it. The traces are student-specific and go through verify, curate
and SFT like any other; the share of rejected tokens says how far teacher and student are apart.

Only the step's sampling settings shape the distributions: unlike `model.generate`, a model's
generation_config.json (e.g. a repetition penalty) is not applied.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    DynamicCache,
    LogitsProcessorList,
    PreTrainedModel,
    StopStringCriteria,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from ..errors import UserError
from ..models import load_config, load_tokenizer, shared_vocabulary
from .base import Completion, SamplingParams
from .hf import HFGenerator


@dataclass(frozen=True)
class GatedCompletion(Completion):
    rejected: int = 0  # completion tokens where the student replaced the teacher's proposal


class StudentGatedGenerator(HFGenerator):
    """The teacher as an `HFGenerator` (loading, scoring, logprobs, stop strings) whose decoding is
    gated by `student`; `gate_stats` counts the completion tokens and the rejected proposals."""

    backend = "rsd"

    def __init__(
        self,
        teacher: Path | str,
        student: Path | str,
        *,
        threshold: float,
        batch_size: int = 64,
        device: str | None = None,
        dtype: str = "auto",
        attn_implementation: str | None = None,
    ):
        if not 0 <= threshold <= 1:
            raise ValueError(f"threshold must be in [0, 1] (a probability), got {threshold}")
        # Before any weights are loaded: the gate compares the two models' probabilities token id by
        # token id, so they must agree on what every id means.
        _check_shared_tokenizer(teacher, student)
        loading = {"dtype": dtype, "attn_implementation": attn_implementation}
        super().__init__(teacher, batch_size=batch_size, device=device, **loading)
        self.student = HFGenerator(student, batch_size=batch_size, device=str(self.device), **loading)
        self.threshold = threshold
        self.gate_stats = {"tokens": 0, "rejected": 0}

    def describe(self) -> dict:
        return {**super().describe(), "gate_model": self.student.path, "gate_threshold": self.threshold}

    def close(self) -> None:
        self.student.close()
        super().close()

    @torch.inference_mode()
    def _generate_batch(
        self, prompts: Sequence[list[int]], sampling: SamplingParams, seeds: Sequence[int] | None = None
    ) -> list[list[GatedCompletion]]:
        # HFGenerator passes seeds with `seed_rows` only (its on-policy sampler), never set here: this
        # backend samples its batch from one random stream
        assert seeds is None, "the rsd backend takes no per-row seeds"
        rows = [prompt for prompt in prompts for _ in range(sampling.n)]  # as num_return_sequences
        inputs = self.tokenizer.pad({"input_ids": rows}, return_tensors="pt").to(self.device)
        tokens, rejected = self._decode(inputs["input_ids"], inputs["attention_mask"], sampling)
        completions = []
        for prompt, ids, flags in zip(rows, tokens.tolist(), rejected.tolist(), strict=True):
            plain = self._completion(ids, len(prompt), sampling.stop)
            # count only the kept tokens: a stop string may cut the decoded ones short
            completions.append(GatedCompletion(**vars(plain), rejected=sum(flags[: plain.completion_tokens])))
        self.gate_stats["tokens"] += sum(c.completion_tokens for c in completions)
        self.gate_stats["rejected"] += sum(c.rejected for c in completions)
        # logprobs asked for are the teacher's own distribution over the gated trace
        return self._finish_batch(rows, completions, sampling)

    def _decode(
        self, input_ids: torch.Tensor, attention: torch.Tensor, sampling: SamplingParams
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """New tokens [B, ≤ max_new_tokens] (pad after a row's end) and where the student rejected the teacher's.

        Each row draws the teacher's proposal exactly as `model.generate` samples (same warpers,
        one multinomial over the batch per step), and the student draws only where it rejects: at
        τ = 0 the traces are the teacher's own, token for token, from the same seed.
        """
        teacher, student = _Decoder(self.model), _Decoder(self.student.model)
        vocab = len(self.tokenizer)  # rows beyond the tokenizer are padding, never a token
        warp = _warpers(sampling)
        stop = StopStringCriteria(self.tokenizer, list(sampling.stop)) if sampling.stop else None
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        # left padding: real tokens at positions 0, 1, …; pads get 0 and are masked out anyway
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        step_ids = sequences = input_ids
        unfinished = torch.ones(len(input_ids), dtype=torch.bool, device=self.device)
        rejections = []
        for _ in range(sampling.max_new_tokens):
            teacher_logits = teacher.step(step_ids, attention, positions)[:, :vocab]
            student_logits = student.step(step_ids, attention, positions)[:, :vocab]
            proposal = _pick(teacher_logits, warp, sampling.greedy)
            acceptance = torch.softmax(student_logits, -1).gather(-1, proposal[:, None])[:, 0]
            rejected = (acceptance < self.threshold) & unfinished
            token = proposal.clone()
            if rejected.any():
                token[rejected] = _pick(student_logits[rejected], warp, sampling.greedy)
            token = torch.where(unfinished, token, pad)
            rejections.append(rejected)
            sequences = torch.cat([sequences, token[:, None]], -1)
            unfinished &= token != eos
            if stop is not None:  # on the whole sequence, as `model.generate` checks it
                unfinished &= ~stop(sequences, None)
            if not unfinished.any():
                break
            step_ids = token[:, None]
            attention = torch.cat([attention, attention.new_ones(len(attention), 1)], -1)
            positions = positions[:, -1:] + 1
        return sequences[:, input_ids.shape[1] :], torch.stack(rejections, 1)


class _Decoder:
    """One model's side of the joint decoding: its KV cache, fed the chosen token at every step."""

    def __init__(self, model: PreTrainedModel):
        self.model = model
        self.cache = DynamicCache(config=model.config)
        # transformers 5.x renamed the forward's `past_key_values` argument to `cache`
        parameters = inspect.signature(model.forward).parameters
        self.cache_argument = "cache" if "cache" in parameters else "past_key_values"

    def step(self, input_ids: torch.Tensor, attention: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Float32 logits [B, V] of the next token; `attention` covers the cache and `input_ids`."""
        output = self.model(
            input_ids=input_ids,
            attention_mask=attention,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **{self.cache_argument: self.cache},
        )
        return output.logits[:, -1].float()


def _warpers(sampling: SamplingParams) -> LogitsProcessorList:
    """The warpers `model.generate` builds for these settings, in its order."""
    warpers = LogitsProcessorList()
    if sampling.temperature not in (0, 1):
        warpers.append(TemperatureLogitsWarper(sampling.temperature))
    if sampling.top_k:
        warpers.append(TopKLogitsWarper(sampling.top_k))
    if sampling.top_p < 1:
        warpers.append(TopPLogitsWarper(sampling.top_p))
    return warpers


def _pick(logits: torch.Tensor, warp: LogitsProcessorList, greedy: bool) -> torch.Tensor:
    if greedy:
        return logits.argmax(-1)
    return torch.multinomial(torch.softmax(warp(None, logits), -1), 1)[:, 0]


def _check_shared_tokenizer(teacher: Path | str, student: Path | str) -> None:
    """The training pre-flight check on tokenizers and configs, so a mismatch costs no weight loading."""
    tokenizers = [load_tokenizer(p) for p in (student, teacher)]
    rows = [load_config(p).get_text_config().vocab_size for p in (student, teacher)]
    try:
        shared_vocabulary(*tokenizers, *rows, str(teacher))
    except UserError as err:
        raise UserError(f"gate_model {student}: {err}") from None
