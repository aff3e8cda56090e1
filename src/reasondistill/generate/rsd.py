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

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError
from ..models import load_config, load_tokenizer, shared_vocabulary
from .base import Completion, SamplingParams
from .decoding import TokenPicker
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
        compile: bool = False,
    ):
        if not 0 <= threshold <= 1:
            raise ValueError(f"threshold must be in [0, 1] (a probability), got {threshold}")
        # Before any weights are loaded: the gate compares the two models' probabilities token id by
        # token id, so they must agree on what every id means.
        _check_shared_tokenizer(teacher, student)
        loading = {"dtype": dtype, "attn_implementation": attn_implementation, "compile": compile}
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
        self, prompts: Sequence[list[int]], sampling: SamplingParams, seeds: Sequence[int]
    ) -> list[list[GatedCompletion]]:
        rows = [prompt for prompt in prompts for _ in range(sampling.n)]  # as num_return_sequences
        # the teacher proposes from each row's stream 0, as the hf backend samples; the student from stream 1
        uniforms = self._uniforms(seeds, sampling), self._uniforms(seeds, sampling, stream=1)
        rejected = torch.zeros(len(rows), sampling.max_new_tokens, dtype=torch.bool, device=self.device)
        gate = _Gate(self.threshold, sampling, rejected, *uniforms)
        tokens = self._decode([self, self.student], rows, sampling, gate)
        completions = []
        for prompt, ids, flags in zip(rows, tokens, gate.rejected.tolist(), strict=True):
            plain = self._completion(ids, len(prompt), sampling.stop)
            # count only the kept tokens: a stop string may cut the decoded ones short
            completions.append(GatedCompletion(**vars(plain), rejected=sum(flags[: plain.completion_tokens])))
        self.gate_stats["tokens"] += sum(c.completion_tokens for c in completions)
        self.gate_stats["rejected"] += sum(c.rejected for c in completions)
        # logprobs asked for are the teacher's own distribution over the gated trace
        return self._finish_batch(rows, completions, sampling)


class _Gate:
    """Chooses each step's tokens from the teacher's and the student's logits, and records where the
    student rejected the teacher's proposal.

    The teacher's proposal is drawn exactly as the hf backend samples (same warpers, the row's
    uniforms), so at τ = 0 a trace is the teacher's own, token for token, from the same seed; the
    student's replacement is drawn from the row's second stream."""

    def __init__(
        self,
        threshold: float,
        sampling: SamplingParams,
        rejected: torch.Tensor,
        proposals: torch.Tensor | None,
        replacements: torch.Tensor | None,
    ):
        self.threshold, self.pick = threshold, TokenPicker(sampling)
        self.rejected = rejected  # [rows, steps], filled in
        self.proposals, self.replacements = proposals, replacements  # uniforms [rows, steps]; None: greedy

    def __call__(self, logits: list[torch.Tensor], live: torch.Tensor, t: int) -> torch.Tensor:
        teacher, student = logits
        proposal = self.pick.at(teacher, self.proposals, live, t)
        acceptance = torch.softmax(student, -1).gather(-1, proposal[:, None])[:, 0]
        rejected = acceptance < self.threshold
        self.rejected[live, t] = rejected
        if not rejected.any():
            return proposal
        replaced = live[rejected]
        own = self.pick.at(student[rejected], self.replacements, replaced, t)
        return proposal.masked_scatter(rejected, own)


def _check_shared_tokenizer(teacher: Path | str, student: Path | str) -> None:
    """The training pre-flight check on tokenizers and configs, so a mismatch costs no weight loading."""
    tokenizers = [load_tokenizer(p) for p in (student, teacher)]
    rows = [load_config(p).get_text_config().vocab_size for p in (student, teacher)]
    try:
        shared_vocabulary(*tokenizers, *rows, str(teacher))
    except UserError as err:
        raise UserError(f"gate_model {student}: {err}") from None
