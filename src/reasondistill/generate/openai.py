"""The `openai` backend: any OpenAI-compatible server (vLLM, SGLang, a hosted API).

One HTTP request per completion (n=1), sent concurrently up to `concurrency` at a time. A request
that fails with a timeout, a dropped connection, a malformed body, 408/409/429 or a 5xx status is
retried with exponential backoff and full jitter, waiting what `Retry-After` asks for when the server
says; after `max_retries` it becomes a `Failure` row for the stage to record. Other 4xx answers
concern that one request (a prompt too long, say) and fail it at once; 401/403/404 concern every
request and stop the job.

Seeds: every request carries its own (`prompt_seeds`): the `generate` stage gives each row one
derived from its identity, so a request retried here, or asked again by a rerun, gets the same
completion from a server that honours per-request seeds (vLLM, SGLang).

Token ids and logprobs: the top-k store needs token *ids*, so logprob requests ask for vLLM's
`return_tokens_as_token_ids` ("token_id:123" tokens). Scoring uses vLLM's `prompt_logprobs` on
`/v1/completions` with the prompt sent as token ids, which needs the teacher's tokenizer locally.
Stored logprobs must be the model's own distribution: values that are not log-probabilities at all
(vLLM's `--logprobs-mode raw_logits`) are refused on sight, and before sampling with logprobs at
other settings than temperature 1 without top-k/top-p, one probe compares the first token's top-k
at both settings, which catches `--logprobs-mode processed_logprobs` (see `_check_raw_logprobs`).

The client is aiohttp rather than the `openai` SDK or httpx. The SDK retries inside the call, so
retries could be neither counted for the progress bar nor turned into failure rows; and both it
and httpx spend most of their time in httpcore's connection pool at 64 concurrent requests (about
130-200 requests/s on 2 cores against an instant server, aiohttp about ten times more; see
benchmarks/openai_client.py), which matters for a job of a million short requests.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import os
import random
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial

import aiohttp
import numpy as np

from ..chat import prompt_ids, reasoning_opener
from ..errors import UserError
from ..records import Message
from ..ui import note
from ..verify.reasoning import format_completion
from .base import (
    Completion,
    Failure,
    Generator,
    ProgressCallback,
    ResultCallback,
    SamplingParams,
    Usage,
    prompt_seeds,
    whole_replies,
)
from .logprobs import TokenLogprobs, from_candidates
from .servers import Server, ServerPool

RETRY_STATUSES = {408, 409, 429}  # plus every 5xx
FATAL_STATUSES = {401, 403, 404}  # wrong key, wrong URL or model name: no request can succeed
MAX_RETRY_AFTER = 600.0  # seconds; a larger Retry-After is capped rather than stalling the job for hours
COMPLETIONS_NEED_TOKENIZER = (
    "tokenizer: the openai backend's completions endpoint applies the chat template here and needs "
    "the teacher's tokenizer (a folder or Hub id)"
)
SCORING_NEEDS_TOKENIZER = (
    "tokenizer: scoring with the openai backend sends prompt + completion as token ids and needs the "
    "teacher's tokenizer (a folder or Hub id)"
)
# The raw-logprobs probe (`_check_raw_logprobs`): k candidates compared at the first position; values
# may differ by 0.05 nats + 2% (a server's numerics vary a little between batches). Temperature
# scaling moves a candidate at log p = -5 by 0.26 nats at temperature 0.95, 1.25 at 0.8.
RAW_CHECK_K = 5
PROBE = [Message(role="user", content="What is 2 + 3?")]
RAW_CHECK_TOLERANCE = 0.05
RAW_CHECK_RELATIVE = 0.02
MASS_SLACK = 0.01  # top-k probabilities may sum to 1 + this (rounding) before they count as logits


class RetryableError(Exception):
    """A failed attempt worth retrying; `wait` is the server's Retry-After in seconds, if it sent one;
    `busy`: the server said it is overloaded (429), which is no sign of a broken server."""

    def __init__(self, message: str, wait: float | None = None, busy: bool = False):
        super().__init__(message)
        self.wait, self.busy = wait, busy


class RequestFailed(Exception):
    """A request that will not succeed by retrying it."""


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = 8
    backoff_base: float = 1.0  # seconds before the first retry, doubled after each attempt
    backoff_max: float = 60.0

    def delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, MAX_RETRY_AFTER)
        # full jitter: requests that failed together do not come back together
        return random.uniform(0, min(self.backoff_max, self.backoff_base * 2**attempt))


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header: delay-seconds or an HTTP date (RFC 9110 §10.2.3)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def token_id(token: str) -> int:
    """The id in a vLLM `token_id:123` token (asked for with return_tokens_as_token_ids)."""
    prefix, _, number = token.partition(":")
    if prefix != "token_id" or not number.lstrip("-").isdigit():
        raise UserError(
            f"the server returned the token {token!r} where an id ('token_id:<n>') was expected; "
            "logprob capture needs a server with vLLM's return_tokens_as_token_ids (vLLM, SGLang)"
        )
    return int(number)


class LoopThread:
    """An asyncio event loop running in a daemon thread; `run` a coroutine on it from any thread."""

    def __init__(self, name: str):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def run(self, coroutine: Awaitable):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


class OpenAIGenerator(Generator):
    """A client of one served model, or of several serving it (see servers.py). `generate` and
    `score` may be called from several threads at once: they share one event loop, the concurrency
    limit and the servers' bookkeeping (`close` stops the loop)."""

    backend = "openai"
    concurrent_calls = True

    def __init__(
        self,
        model: str,
        base_url: str | Sequence[str],
        *,
        endpoint: str = "chat",
        api_key_env: str = "OPENAI_API_KEY",
        tokenizer: str | None = None,
        concurrency: int = 64,
        timeout: float = 600.0,
        retry: RetryPolicy = RetryPolicy(),
    ):
        if endpoint not in ("chat", "completions"):
            raise UserError(f"openai backend: endpoint must be chat or completions, got {endpoint!r}")
        if endpoint == "completions" and not tokenizer:
            raise UserError(COMPLETIONS_NEED_TOKENIZER)
        urls = [base_url] if isinstance(base_url, str) else list(base_url)
        try:
            self.pool = ServerPool(urls)
        except ValueError as err:
            raise UserError(f"base_url: {err}") from None
        self.model, self.endpoint = model, endpoint
        self.base_url = ", ".join(server.url for server in self.pool.servers)  # for messages
        self.api_key_env = api_key_env
        self.concurrency, self.timeout, self.retry = concurrency, timeout, retry
        self.tokenizer = None
        if tokenizer:
            from ..models import load_tokenizer

            self.tokenizer = load_tokenizer(tokenizer, chat_template=endpoint == "completions")
        self.usage = Usage()
        self._raw_logprobs_checked: set[tuple] = set()  # sampling settings whose logprobs were probed
        self._vocabulary_checked: set[str] = set()  # servers whose token ids were checked
        # Every call runs on one event loop in a thread of its own, so calls made from several threads
        # at once (the shards a job keeps open) share the concurrency limit and the server pool.
        self._loop: LoopThread | None = None
        self._loop_lock, self._check_lock = threading.Lock(), threading.Lock()
        self._slots: asyncio.Semaphore | None = None

    def describe(self) -> dict:
        # The API key is deliberately absent: only the name of the variable it came from.
        return {
            "backend": self.backend,
            "model": self.model,
            "base_url": [server.url for server in self.pool.servers],
            "endpoint": self.endpoint,
            "api_key_env": self.api_key_env,
        }

    # ---- public interface ----------------------------------------------------------------------
    def generate(
        self,
        prompts: Sequence[list[Message]],
        sampling: SamplingParams,
        progress: ProgressCallback | None = None,
        seeds: Sequence[int] | None = None,
        on_result: ResultCallback | None = None,
    ) -> list[list[Completion | Failure]]:
        """One request per sample: sample j of prompt i is sent with seed `seeds[i] + j` (see
        `prompt_seeds`), so it gets the same completion whenever and with whatever else it is sent."""
        rendered: Sequence = prompts if self.endpoint == "chat" else prompt_ids(self.tokenizer, prompts)
        if prompts and sampling.wants_logprobs:
            with self._check_lock:  # calls running at once (open shards) probe once
                self._check_raw_logprobs(sampling)
        jobs = [
            (i, self._completion_body(rendered[i], sampling, seed + j))
            for i, seed in enumerate(prompt_seeds(sampling, len(prompts), seeds))
            for j in range(sampling.n)
        ]
        opener = "" if self.endpoint == "chat" else reasoning_opener(self.tokenizer)
        # completions endpoint: the prompt was rendered here, with the template's reasoning opener
        whole = partial(_whole_reply, opener=opener, on_result=on_result) if on_result else None
        results = self._run([(body, self._parser(sampling)) for _, body in jobs], self._path, progress, whole)
        grouped: list[list[Completion | Failure]] = [[] for _ in prompts]
        for (i, _), result in zip(jobs, results, strict=True):
            grouped[i].append(result)
        return whole_replies(grouped, opener)

    def score(
        self,
        prompts: Sequence[list[Message]],
        completions: Sequence[str],
        top_k: int,
        progress: ProgressCallback | None = None,
        on_result: ResultCallback | None = None,
    ) -> list[TokenLogprobs | Failure]:
        """Teacher-forced top-k via vLLM's `prompt_logprobs`, the prompt sent as token ids."""
        if self.tokenizer is None:
            raise UserError(SCORING_NEEDS_TOKENIZER)
        return super().score(prompts, completions, top_k, progress, on_result)

    def score_ids(
        self,
        prompts: Sequence[list[int]],
        completions: Sequence[list[int]],
        top_k: int,
        progress: ProgressCallback | None = None,
        on_result: ResultCallback | None = None,
    ) -> list[TokenLogprobs | Failure]:
        """The teacher's distribution at every completion token, prompt and completion given as ids."""
        requests = []
        for prompt, reply in zip(prompts, completions, strict=True):
            body = {
                "model": self.model,
                "prompt": prompt + reply,
                "max_tokens": 1,
                "temperature": 0.0,
                "prompt_logprobs": top_k,
            }
            requests.append(
                (body, partial(_parse_prompt_logprobs, prompt_length=len(prompt), reply=reply, top_k=top_k))
            )
        return self._run(requests, "/completions", progress, on_result)

    # ---- raw logprobs ---------------------------------------------------------------------------
    def _check_raw_logprobs(self, sampling: SamplingParams) -> None:
        """Stop before any row is generated if the server's logprobs are not the model's own distribution.

        vLLM started with `--logprobs-mode processed_logprobs` reports logprobs after temperature and
        top-k/top-p: log-probabilities still (they sum to at most 1), but of the sampling distribution.
        The first generated position's top-k depends on the prompt alone, so it is asked for twice
        (one token each): with this call's settings and with neutral ones (temperature 1, no top-k or
        top-p, where processed and raw values coincide); raw values agree, processed ones differ.
        Settings that are neutral already need no check. Once per generator and settings, on every
        server of the pool (one started with other flags would store another distribution), on a
        fixed prompt and seed (`PROBE`), so the probe is the same whichever call of a job makes it."""
        settings = (sampling.temperature, sampling.top_p, sampling.top_k)
        if settings == (1.0, 1.0, 0) or settings in self._raw_logprobs_checked:
            return
        k = max(sampling.top_logprobs, RAW_CHECK_K)
        probe = replace(sampling, n=1, max_new_tokens=1, stop=(), logprobs=True, top_logprobs=k)
        neutral = replace(probe, temperature=1.0, top_p=1.0, top_k=0)
        prompt = PROBE if self.endpoint == "chat" else prompt_ids(self.tokenizer, [PROBE])[0]
        requests = [(self._completion_body(prompt, s, 0), self._parser(s)) for s in (neutral, probe)]
        for server in self.pool.servers:
            self._check_raw_answers(
                server.url, self._run(requests, self._path, None, server=server), sampling
            )
        self._raw_logprobs_checked.add(settings)

    @staticmethod
    def _check_raw_answers(url: str, answers: list, sampling: SamplingParams) -> None:
        """The probe's two answers from the server at `url`: (neutral, with the call's settings)."""
        failed = [a for a in answers if isinstance(a, Failure)]
        if failed:
            note(
                f"[yellow]warning:[/] {url}: could not check that the server's logprobs are "
                f"the model's raw distribution ({failed[0].error}); vLLM must run with "
                "--logprobs-mode raw_logprobs (its default)"
            )
            return
        raw, used = (_first_position(a.logprobs) for a in answers)
        for token in raw.keys() & used.keys():
            if abs(raw[token] - used[token]) > RAW_CHECK_TOLERANCE + RAW_CHECK_RELATIVE * abs(raw[token]):
                raise UserError(
                    f"{url}: the server's logprobs change with the sampling settings (token "
                    f"{token}: {raw[token]:.3f} at temperature 1, {used[token]:.3f} at temperature "
                    f"{sampling.temperature:g}, top_p {sampling.top_p:g}, top_k {sampling.top_k}), so they are "
                    "not the model's raw distribution; start vLLM with --logprobs-mode raw_logprobs (its default)"
                )

    def _check_vocabulary(self, url: str, completion: Completion) -> None:
        """Stop if a server's token ids are not the local tokenizer's (another model, another revision):
        its logprobs would be stored under the wrong tokens. The first completion with ids from each
        server is checked: its ids must be in the tokenizer's range and decode to its text (a line of
        it, whitespace aside: the stop string and a server's reasoning split may differ)."""
        if self.tokenizer is None or not completion.token_ids or url in self._vocabulary_checked:
            return
        size, largest = len(self.tokenizer), max(completion.token_ids)
        name = getattr(self.tokenizer, "name_or_path", "")
        if largest >= size:
            raise UserError(
                f"{url}: returned token id {largest}, beyond the {size} tokens of the tokenizer {name}; the "
                "server runs another tokenizer than --tokenizer names"
            )
        decoded = " ".join(self.tokenizer.decode(completion.token_ids, skip_special_tokens=True).split())
        lines = [" ".join(line.split()) for line in completion.text.splitlines()] or [""]
        lines = lines[:-1] if len(lines) > 1 else [lines[0][: len(lines[0]) // 2]]  # the last may end cut
        sample = max(lines, key=len)
        if len(sample) < 8:
            return  # too short to tell; a later completion is checked
        if sample not in decoded:
            raise UserError(
                f"{url}: the token ids it returned decode, with the tokenizer {name}, to {decoded[:60]!r}, "
                f"not to its text {sample[:60]!r}; the server runs another tokenizer than --tokenizer names"
            )
        self._vocabulary_checked.add(url)

    # ---- request bodies and answers -------------------------------------------------------------
    @property
    def _path(self) -> str:
        return "/chat/completions" if self.endpoint == "chat" else "/completions"

    def _parser(self, sampling: SamplingParams) -> Callable[[dict], Completion]:
        parse = self._parse_chat if self.endpoint == "chat" else self._parse_completion
        return partial(parse, sampling=sampling)

    def _completion_body(self, prompt, sampling: SamplingParams, seed: int) -> dict:
        body: dict = {
            "model": self.model,
            "n": 1,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
        }
        if self.endpoint == "chat":
            body["messages"] = [m.model_dump() for m in prompt]
            body["max_completion_tokens"] = sampling.max_new_tokens
        else:
            body["prompt"] = prompt
            body["max_tokens"] = sampling.max_new_tokens
        if not sampling.greedy:
            body["seed"] = seed
        if sampling.top_k:
            body["top_k"] = sampling.top_k  # a vLLM/SGLang extension; sent only when asked for
        if sampling.stop:
            body["stop"] = list(sampling.stop)
        if sampling.wants_logprobs:
            body["return_tokens_as_token_ids"] = True
            if self.endpoint == "chat":
                body["logprobs"] = True
                body["top_logprobs"] = sampling.top_logprobs
            else:
                body["logprobs"] = sampling.top_logprobs
        return body

    def _parse_chat(self, answer: dict, sampling: SamplingParams) -> Completion:
        choice = _only_choice(answer)
        text = _reply_text(choice["message"])
        positions = None
        if sampling.wants_logprobs:
            content = (choice.get("logprobs") or {}).get("content")
            if content is None:
                raise UserError("the server returned no logprobs although they were asked for")
            positions = [
                (
                    token_id(p["token"]),
                    p["logprob"],
                    {token_id(c["token"]): c["logprob"] for c in p.get("top_logprobs") or []},
                )
                for p in content
            ]
        return _completion(answer, choice, text, positions, sampling.top_logprobs)

    def _parse_completion(self, answer: dict, sampling: SamplingParams) -> Completion:
        choice = _only_choice(answer)
        positions = None
        if sampling.wants_logprobs:
            logprobs = choice.get("logprobs")
            if not logprobs:
                raise UserError("the server returned no logprobs although they were asked for")
            tops = logprobs.get("top_logprobs") or [{}] * len(logprobs["tokens"])
            positions = [
                (token_id(token), logprob, {token_id(t): lp for t, lp in (top or {}).items()})
                for token, logprob, top in zip(
                    logprobs["tokens"], logprobs["token_logprobs"], tops, strict=True
                )
            ]
        return _completion(answer, choice, choice["text"], positions, sampling.top_logprobs)

    # ---- the request loop -----------------------------------------------------------------------
    def _run(
        self,
        requests: Sequence[tuple[dict, Callable[[dict], object]]],
        path: str,
        progress: ProgressCallback | None,
        on_result: ResultCallback | None = None,
        server: Server | None = None,
    ) -> list:
        """Send every (body, parse) request; the parsed answer or a Failure for each, in order.
        `on_result(i, result)` is called as request i finishes (from the client's loop thread).
        With `server`, every attempt goes to that server of the pool, not to the one it picks."""
        with self._loop_lock:
            if self._loop is None:
                self._loop = LoopThread("openai-client")
        return self._loop.run(self._run_async(requests, path, progress, on_result, server))

    async def _run_async(self, requests, path: str, progress, on_result, server: Server | None) -> list:
        headers = {"Content-Type": "application/json"}
        api_key = os.environ.get(self.api_key_env)
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        if self._slots is None:  # made on the client's loop, shared by the calls running at once
            self._slots = asyncio.Semaphore(self.concurrency)
        slots = self._slots
        async with aiohttp.ClientSession(
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=self.timeout),
            connector=aiohttp.TCPConnector(limit=self.concurrency),
        ) as session:

            async def one(position: int, body: dict, parse: Callable[[dict], object]):
                result = await self._with_retries(
                    lambda: self._attempt(session, slots, path, body, parse, server)
                )
                if on_result:
                    on_result(position, result)
                if progress:
                    progress(1)
                return result

            tasks = [asyncio.ensure_future(one(i, body, parse)) for i, (body, parse) in enumerate(requests)]
            try:
                return await asyncio.gather(*tasks)
            finally:
                for task in tasks:  # a fatal error in one request stops the others
                    task.cancel()

    def close(self) -> None:
        with self._loop_lock:
            loop, self._loop = self._loop, None
        if loop is not None:
            loop.close()

    async def _attempt(
        self,
        session: aiohttp.ClientSession,
        slots: asyncio.Semaphore,
        path: str,
        body: dict,
        parse,
        pinned: Server | None = None,
    ):
        """One attempt, on the server the pool picks (or on `pinned`): it is told whether the server
        failed (a retry is placed afresh, so it may go to another)."""
        async with slots:
            server = await self.pool.acquire(pinned)
            try:
                result, tokens = await self._send(session, f"{server.url}{path}", body, parse)
            except (RetryableError, RequestFailed) as err:
                self.usage.count_server(server.url, errors=1)
                # a 429 says busy, not broken; a RequestFailed concerns the request
                server_failed = isinstance(err, RetryableError) and not err.busy
                if self.pool.release(server, failed=server_failed):
                    self.usage.count_server(server.url, rests=1)
                raise
            except BaseException:
                self.pool.release(server, failed=False)
                raise
            self.pool.release(server, failed=False)
        if isinstance(result, Completion):
            self._check_vocabulary(server.url, result)
        self.usage.add(Usage(requests=1, **tokens))
        self.usage.count_server(server.url, requests=1, completion_tokens=tokens["completion_tokens"])
        return result

    async def _send(self, session: aiohttp.ClientSession, url: str, body: dict, parse) -> tuple[object, dict]:
        """POST `body` to `url`: the parsed answer and its token usage, or the error to retry or fail with."""
        try:
            async with session.post(url, data=json.dumps(body)) as response:
                status, retry_after, content = (
                    response.status,
                    response.headers.get("Retry-After"),
                    await response.read(),
                )
        except asyncio.TimeoutError:
            raise RetryableError(f"{url}: no answer within {self.timeout:g} s") from None
        except aiohttp.ClientError as err:
            raise RetryableError(f"{url}: connection error ({type(err).__name__})") from None
        if status in FATAL_STATUSES:
            raise UserError(
                f"{url}: HTTP {status} ({_error_message(content)}); check the URL, model name and ${self.api_key_env}"
            )
        if status in RETRY_STATUSES or status >= 500:
            raise RetryableError(
                f"HTTP {status} ({_error_message(content)})",
                parse_retry_after(retry_after),
                busy=status == 429,
            )
        if status != 200:
            raise RequestFailed(f"HTTP {status} ({_error_message(content)})")
        try:
            answer = json.loads(content)
            result = parse(answer)
        except json.JSONDecodeError:
            raise RetryableError("malformed JSON in the answer") from None
        except (KeyError, IndexError, TypeError, ValueError) as err:
            raise RetryableError(f"unexpected answer shape ({type(err).__name__}: {err})") from None
        return result, _token_usage(answer)

    async def _with_retries(self, attempt: Callable[[], Awaitable]) -> object:
        for number in range(self.retry.max_retries + 1):
            try:
                return await attempt()
            except RequestFailed as err:
                self.usage.failures += 1
                return Failure(str(err), attempts=number + 1)
            except RetryableError as err:
                if number == self.retry.max_retries:
                    self.usage.failures += 1
                    return Failure(str(err), attempts=number + 1)
                self.usage.retries += 1
                await asyncio.sleep(self.retry.delay(number, err.wait))
        raise AssertionError("unreachable")


def _whole_reply(position: int, result, opener: str, on_result: ResultCallback) -> None:
    """`on_result` with the reply as `generate` returns it (the reasoning opener in front)."""
    on_result(position, whole_replies([[result]], opener)[0][0])


def _only_choice(answer: dict) -> dict:
    choices = answer["choices"]
    if len(choices) != 1:
        raise ValueError(f"expected 1 choice, got {len(choices)}")
    return choices[0]


def _token_usage(answer: dict) -> dict:
    usage = answer.get("usage") or {}
    return {
        "prompt_tokens": usage.get("prompt_tokens") or 0,
        "completion_tokens": usage.get("completion_tokens") or 0,
    }


def _first_position(logprobs: TokenLogprobs) -> dict[int, float]:
    """The top-k at a completion's first position, {token id: logprob} (empty for no token)."""
    if not len(logprobs):
        return {}
    return dict(
        zip(logprobs.topk_ids[0].tolist(), logprobs.topk_logprobs[0].astype(float).tolist(), strict=True)
    )


def check_distribution(logprobs: TokenLogprobs) -> TokenLogprobs:
    """Refuse values that cannot be log-probabilities: a positive one, or top-k probabilities
    summing to more than 1 (vLLM's `--logprobs-mode raw_logits` or `processed_logits`)."""
    masses = np.exp(logprobs.topk_logprobs.astype(np.float64)).sum(axis=-1)
    largest = max(logprobs.logprobs.max(initial=-np.inf), logprobs.topk_logprobs.max(initial=-np.inf))
    if largest > MASS_SLACK or masses.max(initial=0.0) > 1 + MASS_SLACK:
        raise UserError(
            f"the server's logprobs are not log-probabilities (largest {float(largest):.3g}, top-k "
            f"probabilities summing to up to {float(masses.max(initial=0.0)):.3g}): logits? start vLLM "
            "with --logprobs-mode raw_logprobs (its default)"
        )
    return logprobs


def _reply_text(message: dict) -> str:
    """A chat answer's whole reply. A server that parses reasoning out (vLLM's `--reasoning-parser`,
    DeepSeek's API) returns it as `reasoning_content` (`reasoning` in newer vLLM) beside the answer:
    both are kept, as `<think>reasoning</think>answer`, the text the model wrote."""
    content = message.get("content") or ""
    reasoning = message.get("reasoning_content") or message.get("reasoning")
    return format_completion(reasoning.strip(), content.strip()) if reasoning else content


def _completion(answer: dict, choice: dict, text: str, positions, top_k: int) -> Completion:
    finish = choice.get("finish_reason")
    if finish not in ("stop", "length"):
        raise RequestFailed(f"finish_reason {finish!r}")
    usage = _token_usage(answer)
    logprobs = None
    token_ids: list[int] = []
    if positions is not None:
        token_ids = [token for token, _, _ in positions]
        logprobs = check_distribution(
            from_candidates(token_ids, [lp for _, lp, _ in positions], [c for _, _, c in positions], top_k)
        )
    return Completion(
        text=text,
        token_ids=token_ids,
        finish_reason=finish,
        prompt_tokens=usage["prompt_tokens"],
        completion_tokens=usage["completion_tokens"] or len(token_ids),
        logprobs=logprobs,
    )


def _parse_prompt_logprobs(answer: dict, prompt_length: int, reply: list[int], top_k: int) -> TokenLogprobs:
    entries = _only_choice(answer).get("prompt_logprobs")
    if entries is None:
        raise UserError(
            "the server returned no prompt_logprobs; scoring needs vLLM's prompt_logprobs extension"
        )
    if len(entries) != prompt_length + len(reply):
        raise ValueError(f"{len(entries)} prompt_logprobs entries for {prompt_length + len(reply)} tokens")
    candidates = [
        {int(token): entry["logprob"] for token, entry in position.items()}
        for position in entries[prompt_length:]
    ]
    return check_distribution(
        from_candidates(
            reply, [c[token] for c, token in zip(candidates, reply, strict=True)], candidates, top_k
        )
    )


def _error_message(content: bytes) -> str:
    """The server's own explanation, from an OpenAI-style error body or the start of the text."""
    try:
        return str(json.loads(content)["error"]["message"])[:200]
    except (ValueError, KeyError, TypeError):
        return content[:200].decode(errors="replace") or "no body"
