"""The Generator interface every backend implements (hf, openai, vllm), and what it returns."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Protocol

from ..records import FinishReason, Message
from .logprobs import TokenLogprobs


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1  # completions per prompt
    temperature: float = 1.0  # 0 means greedy decoding
    top_p: float = 1.0
    top_k: int = 0  # 0 disables top-k filtering
    max_new_tokens: int = 512
    seed: int = 0
    stop: tuple[str, ...] = ()  # strings that end a completion (not included in its text)
    logprobs: bool = False  # return the logprob of every generated token
    top_logprobs: int = 0  # and the teacher's k most likely tokens at every position (implies logprobs)

    def __post_init__(self):
        if self.n < 1 or self.max_new_tokens < 1:
            raise ValueError("n and max_new_tokens must be at least 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0 or self.top_logprobs < 0:
            raise ValueError("temperature must be >= 0, top_p in (0, 1], top_k and top_logprobs >= 0")
        if self.temperature == 0 and self.n > 1:
            raise ValueError("greedy decoding (temperature 0) gives one completion per prompt; set n=1")
        if "" in self.stop:
            raise ValueError("stop strings must not be empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def wants_logprobs(self) -> bool:
        return self.logprobs or self.top_logprobs > 0

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def row_seed(seed: int, problem_id: str, sample_idx: int) -> int:
    """The sampling seed of one output row, from the step's seed and the row's identity alone.

    A row keeps its seed whichever request list, shard or rerun it is sent in, so a rerun that asks
    again for the rows that failed gets the completions an uninterrupted run gets (with a backend
    that seeds each request: openai, vllm)."""
    digest = hashlib.sha256(json.dumps([seed, problem_id, sample_idx]).encode()).digest()
    return int.from_bytes(digest[:8], "big") % 2**31


def prompt_seeds(sampling: SamplingParams, count: int, seeds: Sequence[int] | None) -> list[int]:
    """The seed of each of `count` prompts; prompt i's n samples are drawn with seed_i, seed_i + 1, …
    (vLLM's own rule for a request with n > 1).

    `seeds` (one per prompt, e.g. `row_seed`s) are taken as given; without them the i-th prompt of
    the call gets `sampling.seed + i·n`, so no two samples of a call share a seed, but a prompt's
    samples then depend on its place in the list."""
    if seeds is None:
        return [sampling.seed + i * sampling.n for i in range(count)]
    if len(seeds) != count:
        raise ValueError(f"{len(seeds)} seeds for {count} prompts")
    return list(seeds)


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: list[int]  # empty when the backend does not report ids (an API without logprobs)
    finish_reason: FinishReason  # "stop": end of turn or a stop string; "length": max_new_tokens reached
    prompt_tokens: int
    completion_tokens: int
    logprobs: TokenLogprobs | None = None  # when the sampling parameters asked for them


@dataclass(frozen=True)
class Failure:
    """A request that still failed after its retries: recorded and reported, never dropped."""

    error: str
    attempts: int


@dataclass
class Usage:
    """What a generator has spent so far: the stage's progress bar, manifest and cost come from it."""

    requests: int = 0  # answered requests (a checking probe included)
    retries: int = 0  # attempts repeated after a retryable error
    failures: int = 0  # requests that still failed after their retries
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, other: Usage) -> None:
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)


ProgressCallback = Callable[[int], None]  # called with the number of rows just finished


class Generator(Protocol):
    backend: str
    usage: Usage

    def describe(self) -> dict:
        """What produced the completions (backend, model, server): recorded with every trace."""

    def generate(
        self,
        prompts: Sequence[list[Message]],
        sampling: SamplingParams,
        progress: ProgressCallback | None = None,
        seeds: Sequence[int] | None = None,
    ) -> list[list[Completion | Failure]]:
        """`sampling.n` completions (or failures) for each chat prompt, in prompt order.

        `seeds`: one per prompt (see `prompt_seeds`), for backends that seed each request (openai,
        vllm); the hf backend samples a call from one random stream seeded by `sampling.seed`."""

    def score(
        self,
        prompts: Sequence[list[Message]],
        completions: Sequence[str],
        top_k: int,
        progress: ProgressCallback | None = None,
    ) -> list[TokenLogprobs | Failure]:
        """The model's distribution over each given completion of each prompt (teacher forcing)."""

    def score_ids(
        self,
        prompts: Sequence[list[int]],
        completions: Sequence[list[int]],
        top_k: int,
        progress: ProgressCallback | None = None,
    ) -> list[TokenLogprobs | Failure]:
        """Like `score`, prompts (chat template applied) and completions given as token ids."""

    def close(self) -> None:
        """Release the model or connections."""
