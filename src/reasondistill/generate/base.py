"""The Generator base class every backend extends (hf, openai, vllm; rsd over hf), what it is asked
for (SamplingParams, made of the sampling fields every options model shares) and what it returns."""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Annotated, ClassVar

from pydantic import Field
from pydantic.dataclasses import dataclass as pydantic_dataclass

from ..chat import completion_ids, prompt_ids, reasoning_opener, with_opener
from ..records import FinishReason, Message, Problem, Trace
from ..verify.reasoning import split_reasoning
from .logprobs import TokenLogprobs

if TYPE_CHECKING:  # an annotation only: transformers takes seconds to import, a stage's --help must not
    from transformers import PreTrainedTokenizerBase

# ---- the sampling fields --------------------------------------------------------------------------
# Each declared once, with its bounds and help. SamplingParams is made of them, and so is every model
# of options that samples (SamplingOptions, rewrite's TeacherOptions, OnPolicyOptions, the test
# server's requests): each declares its field with the type and sets only its default (and its help
# where it says more), so pydantic checks the same bounds everywhere. (A model that redeclares an
# inherited field keeps the constraints only when they are part of the type, hence types.)
Samples = Annotated[int, Field(ge=1, description="completions per prompt")]
Temperature = Annotated[float, Field(ge=0, description="sampling temperature (0: greedy)")]
TopP = Annotated[float, Field(gt=0, le=1, description="nucleus sampling mass")]
TopK = Annotated[int, Field(ge=0, description="top-k filtering (0: off)")]
MaxNewTokens = Annotated[
    int, Field(ge=1, description="completion token limit; longer ones are cut and unparseable")
]
StopStrings = Annotated[list[str], Field(description="strings that end a completion (left out of its text)")]
Seed = Annotated[int, Field(description="sampling seed")]
TopLogprobs = Annotated[
    int, Field(ge=0, description="the model's k most likely tokens at every position (implies logprobs)")
]


@pydantic_dataclass(frozen=True)
class SamplingParams:
    """What a generator is asked for: a frozen value, checked by pydantic when made (`replace` too).

    Bounds come with the field types (a ValidationError, which is a ValueError, names the field);
    `__post_init__` checks only what no single field can: combinations."""

    n: Samples = 1
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    top_k: TopK = 0
    max_new_tokens: MaxNewTokens = 512
    seed: Seed = 0
    stop: tuple[str, ...] = ()  # StopStrings, frozen
    logprobs: bool = False  # return the logprob of every generated token
    top_logprobs: TopLogprobs = 0

    def __post_init__(self):
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


def completion_to_json(completion: Completion) -> dict:
    """A completion as a JSON object (a job's journal), its logprobs included."""
    fields = {
        name: getattr(completion, name)
        for name in ("text", "token_ids", "finish_reason", "prompt_tokens", "completion_tokens")
    }
    logprobs = completion.logprobs
    return {**fields, "logprobs": None if logprobs is None else logprobs.to_json()}


def completion_from_json(value: dict) -> Completion:
    logprobs = value.get("logprobs")
    return Completion(
        **{**value, "logprobs": None if logprobs is None else TokenLogprobs.from_json(logprobs)}
    )


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
    # openai backend: per server URL, its requests, completion tokens, failed attempts and rests
    servers: dict[str, dict[str, int]] = field(default_factory=dict)

    def add(self, other: Usage, sign: int = 1) -> None:
        """Add `other`'s counts to these (`sign` -1: subtract them)."""
        for name, value in asdict(other).items():
            if name == "servers":
                for url, counts in value.items():
                    self.count_server(url, **{key: sign * count for key, count in counts.items()})
            else:
                setattr(self, name, getattr(self, name) + sign * value)

    def count_server(self, url: str, **counts: int) -> None:
        mine = self.servers.setdefault(url, dict.fromkeys(SERVER_COUNTS, 0))
        for key, count in counts.items():
            mine[key] = mine.get(key, 0) + count


SERVER_COUNTS = ("requests", "completion_tokens", "errors", "rests")


ProgressCallback = Callable[[int], None]  # called with the number of rows just finished
# Called as each request finishes, with its place in the call (prompt i's sample j: i·n + j; for
# scoring, row i) and its result: the openai backend calls it as answers arrive, the others once
# their call is done. A job journals finished rows through it (shards.py).
ResultCallback = Callable[[int, object], None]


def notify_each(results: Sequence, on_result: ResultCallback | None) -> None:
    """`on_result` for every result of a finished call (prompts' rows of samples flattened)."""
    if on_result is None:
        return
    flat = [item for row in results for item in row] if results and isinstance(results[0], list) else results
    for position, result in enumerate(flat):
        on_result(position, result)


class Generator(ABC):
    """A backend: completions of chat prompts, and the model's distribution over given completions.

    A backend implements `describe`, `generate` and `score_ids` (and `close` if it holds anything);
    `score` is written here once, from `score_ids` and the teacher's tokenizer."""

    backend: ClassVar[str]
    concurrent_calls: ClassVar[bool] = False  # calls from several threads at once share its resources
    usage: Usage
    tokenizer: PreTrainedTokenizerBase | None  # the teacher's; None where a backend can do without

    @abstractmethod
    def describe(self) -> dict:
        """What produced the completions (backend, model, server): recorded with every trace."""

    @abstractmethod
    def generate(
        self,
        prompts: Sequence[list[Message]],
        sampling: SamplingParams,
        progress: ProgressCallback | None = None,
        seeds: Sequence[int] | None = None,
        on_result: ResultCallback | None = None,
    ) -> list[list[Completion | Failure]]:
        """`sampling.n` completions (or failures) for each chat prompt, in prompt order.

        `seeds`: one per prompt (see `prompt_seeds`); every backend seeds each sequence alone (a
        hosted API may ignore seeds)."""

    def score(
        self,
        prompts: Sequence[list[Message]],
        completions: Sequence[str],
        top_k: int,
        progress: ProgressCallback | None = None,
        on_result: ResultCallback | None = None,
    ) -> list[TokenLogprobs | Failure]:
        """The model's distribution over each given completion of each prompt (teacher forcing): the
        prompts rendered with the chat template and the completions tokenized here, for `score_ids`."""
        return self.score_ids(
            prompt_ids(self.tokenizer, prompts),
            completion_ids(self.tokenizer, completions),
            top_k,
            progress,
            on_result,
        )

    @abstractmethod
    def score_ids(
        self,
        prompts: Sequence[list[int]],
        completions: Sequence[list[int]],
        top_k: int,
        progress: ProgressCallback | None = None,
        on_result: ResultCallback | None = None,
    ) -> list[TokenLogprobs | Failure]:
        """Like `score`, prompts (chat template applied) and completions given as token ids."""

    def parameter_count(self) -> int | None:
        """The model's parameters where this backend holds it (hf), else None (a served model)."""
        return None

    def close(self) -> None:  # noqa: B027 - a backend with nothing to release keeps this
        """Release the model or connections (by default there is nothing to release)."""


class TokenIdGenerator(Generator):
    """A backend that decodes prompts given as token ids (hf, vllm; rsd): `generate` renders the chat
    prompts with the teacher's own chat template, so every backend of this kind sees the same ids, and
    callers that hold ids already (on-policy sampling, the test server) call `generate_ids`."""

    def generate(
        self,
        prompts: Sequence[list[Message]],
        sampling: SamplingParams,
        progress: ProgressCallback | None = None,
        seeds: Sequence[int] | None = None,
        on_result: ResultCallback | None = None,
    ) -> list[list[Completion | Failure]]:
        """Completions of chat prompts; where the template's prompt opens the reasoning block, each
        completion's text starts with that opener (the whole reply, see chat.py), its ids do not."""
        completions = self.generate_ids(prompt_ids(self.tokenizer, prompts), sampling, progress, seeds)
        replies = whole_replies(completions, reasoning_opener(self.tokenizer))
        notify_each(replies, on_result)
        return replies

    @abstractmethod
    def generate_ids(
        self,
        prompts: Sequence[list[int]],
        sampling: SamplingParams,
        progress: ProgressCallback | None = None,
        seeds: Sequence[int] | None = None,
    ) -> list[list[Completion | Failure]]:
        """Completions of prompts given as token ids (the chat template already applied)."""


def whole_replies(
    completions: list[list[Completion | Failure]], opener: str
) -> list[list[Completion | Failure]]:
    """Each completion's text with the reasoning `opener` its prompt ended with (none: unchanged)."""
    if not opener:
        return completions
    return [
        [replace(c, text=with_opener(c.text, opener)) if isinstance(c, Completion) else c for c in row]
        for row in completions
    ]


def make_traces(problem: Problem, completions: list[Completion], source: str) -> list[Trace]:
    return [make_trace(problem, sample_idx, c, source) for sample_idx, c in enumerate(completions)]


def make_trace(problem: Problem, sample_idx: int, completion: Completion, source: str) -> Trace:
    split = split_reasoning(completion.text)
    return Trace(
        problem_id=problem.id,
        task=problem.task,
        sample_idx=sample_idx,
        source=source,
        completion=completion.text,
        reasoning=split.reasoning,
        final=split.final,
        prompt_tokens=completion.prompt_tokens,
        completion_tokens=completion.completion_tokens,
        finish_reason=completion.finish_reason,
    )
