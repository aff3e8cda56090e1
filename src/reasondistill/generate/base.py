"""The Generator interface every teacher / student backend implements (hf here; vllm and openai later)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Protocol

from ..records import FinishReason, Message


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1  # completions per prompt
    temperature: float = 1.0  # 0 means greedy decoding
    top_p: float = 1.0
    top_k: int = 0  # 0 disables top-k filtering
    max_new_tokens: int = 512
    seed: int = 0

    def __post_init__(self):
        if self.n < 1 or self.max_new_tokens < 1:
            raise ValueError("n and max_new_tokens must be at least 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError("temperature must be >= 0, top_p in (0, 1], top_k >= 0")
        if self.temperature == 0 and self.n > 1:
            raise ValueError("greedy decoding (temperature 0) gives one completion per prompt; set n=1")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: FinishReason  # "stop": the model ended its turn; "length": max_new_tokens was reached
    prompt_tokens: int
    completion_tokens: int


ProgressCallback = Callable[[int], None]  # called with the number of completions just finished


class Generator(Protocol):
    backend: str

    def describe(self) -> dict:
        """What produced the completions (backend, model, revision): recorded with every trace."""

    def generate(
        self,
        prompts: Sequence[list[Message]],
        sampling: SamplingParams,
        progress: ProgressCallback | None = None,
    ) -> list[list[Completion]]:
        """`sampling.n` completions for each chat prompt, in prompt order."""
