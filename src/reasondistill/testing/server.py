"""A small OpenAI-compatible server: the test double of the `openai` backend client.

Also a fake server to try a pipeline's openai backend on locally (a testbed model, no GPU or API key).

It answers /v1/chat/completions and /v1/completions in the shapes vLLM's OpenAI-compatible server
uses (including its extensions: `top_k`, `return_tokens_as_token_ids`, `prompt_logprobs`), from a
local transformers model run through `HFGenerator`, so tests can check what the client reads
against what the model computes. Two modes make it useful beyond that:

* faults (`Faults`): a deterministic share of requests fails as a real server can (500, 429 with
  Retry-After, a hang longer than the client's timeout, a truncated JSON body, a dropped
  connection), at most a few times per request body, so every request succeeds within the client's
  retries; a `poison` text makes every request that contains it fail, to test failures that persist.
* instant (no model): every request gets the same small completion at once, with well-formed fake
  logprobs when asked for, to measure the client's own overhead.
* processed logprobs (`logprobs_mode="processed_logprobs"`): like vLLM started with
  `--logprobs-mode processed_logprobs`, generated tokens' logprobs come from the distribution the
  request samples from (the logits divided by its temperature; top-k/top-p are not played), to test
  that the client refuses them.

Model calls run one at a time on a worker thread (identical requests with a seed give identical
completions, as torch's random state is global), so the server keeps answering other connections
while a request hangs or the model works.

    python -m reasondistill.testing.server --model testbed:teacher --served-name teacher --port 0
    python -m reasondistill.testing.server --instant --faults-rate 0.3 --faults-kinds 500,429,drop

print one line, `listening on http://127.0.0.1:PORT/v1`, once the server is ready.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import hmac
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..chat import prompt_ids
from ..errors import dotted
from ..generate.base import Completion, MaxNewTokens, Samples, SamplingParams, Temperature, TopLogprobs, TopP
from ..generate.hf import HFGenerator
from ..generate.logprobs import TokenLogprobs
from ..records import Message
from ..testbed.refs import TESTBED_PREFIX, resolve_testbed_model

FAULT_KINDS = ("500", "429", "hang", "malformed", "drop")
LOGPROBS_MODES = ("raw_logprobs", "processed_logprobs")  # vLLM's names; its raw_logits modes are not played
MIN_LOGPROB = -9999.0  # vLLM clamps -inf (and float16 underflow) to this, which keeps the JSON valid
STOP_GRACE_SECONDS = 1.0  # in-flight requests (a hanging one, say) get this long when the server stops
# A 200 answer cut off mid-document: valid HTTP, invalid JSON.
MALFORMED_BODY = (
    b'{"id": "cmpl-malformed", "object": "chat.completion", "choices": [{"index": 0, "message": {"ro'
)

# Instant mode's fixed completion, its tokens and ids (made up: there is no tokenizer).
INSTANT_PIECES = {101: "The", 102: " answer", 103: " is", 104: " 42", 105: "."}
INSTANT_PROMPT_TOKENS = 10  # counted for a text or chat prompt; a prompt of token ids counts its own
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions, used for both endpoints here


@dataclass(frozen=True)
class Faults:
    """Which requests fail, and how. Every decision is a hash, so runs are reproducible: a request
    body's key is the sha256 of its canonical JSON, its attempt the number of times the key was seen
    before; an attempt below `max_faults_per_request` fails when sha256(seed, key, attempt), mapped
    to [0, 1), is below `rate`, with a kind picked by the same hash. Bodies that are not valid
    requests get their 400 and take no part."""

    rate: float = 0.0  # share of attempts that fail, among those still allowed to
    kinds: tuple[str, ...] = FAULT_KINDS
    retry_after: str = "1"  # the 429 answer's Retry-After header
    hang_seconds: float = 30.0  # longer than the client's timeout: it gives up first
    max_faults_per_request: int = 2  # a request body fails at most this often, then always succeeds
    poison: str | None = None  # requests whose prompt contains this fail with 500 every time
    seed: int = 0

    def __post_init__(self):
        if not 0 <= self.rate <= 1:
            raise ValueError(f"fault rate must be in [0, 1], got {self.rate}")
        unknown = set(self.kinds) - set(FAULT_KINDS)
        if unknown or not self.kinds:
            raise ValueError(f"fault kinds must be a non-empty subset of {', '.join(FAULT_KINDS)}")

    def decide(self, key: str, attempt: int) -> str | None:
        """The fault for the `attempt`-th sighting (from 0) of the request body hashed to `key`, if any."""
        if attempt >= self.max_faults_per_request:
            return None
        digest = hashlib.sha256(f"{self.seed}:{key}:{attempt}".encode()).digest()
        if int.from_bytes(digest[:8], "big") / 2**64 >= self.rate:
            return None
        return self.kinds[int.from_bytes(digest[8:16], "big") % len(self.kinds)]


@dataclass(frozen=True)
class Pace:
    """How long answers take, as a loaded server's do: each request holds one of `capacity` slots (the
    others queue) for `latency` seconds, or `slow_factor` times that for the share `slow_share` of
    request bodies (picked by a hash of the body, so a resent request is slow again)."""

    latency: float = 0.0
    capacity: int | None = None  # requests served at once (None: no limit)
    slow_share: float = 0.0
    slow_factor: float = 20.0

    def __post_init__(self):
        if self.latency < 0 or not 0 <= self.slow_share <= 1 or self.slow_factor < 1:
            raise ValueError("pace: latency >= 0, slow_share in [0, 1] and slow_factor >= 1 expected")
        if self.capacity is not None and self.capacity < 1:
            raise ValueError(f"pace: capacity must be at least 1, got {self.capacity}")

    def seconds(self, raw: bytes) -> float:
        if not self.slow_share:
            return self.latency
        digest = hashlib.sha256(b"pace:" + raw).digest()
        slow = int.from_bytes(digest[:8], "big") / 2**64 < self.slow_share
        return self.latency * (self.slow_factor if slow else 1.0)


# ---- request bodies -------------------------------------------------------------------------------


class RequestError(Exception):
    """A request answered with an error status and vLLM's error body."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.kind = status, kind

    def response(self) -> web.Response:
        return error_response(self.status, str(self), self.kind)


def error_response(status: int, message: str, kind: str, headers: dict | None = None) -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": None, "code": status}}
    return web.json_response(body, status=status, headers=headers)


class _Request(BaseModel):
    """What both endpoints accept. Strict: a string where a number belongs is a 400, not a guess."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: str | None = None
    n: Samples = 1
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    top_k: int = Field(0, ge=-1)  # vLLM: 0 or -1 turns it off
    max_tokens: MaxNewTokens | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    return_tokens_as_token_ids: bool = False
    stream: Literal[False] = False  # answers are never streamed

    def sampling(self, max_tokens: int, top_logprobs: int | None) -> SamplingParams:
        """The request as generator parameters; settings no request can combine (greedy n > 1) are a 400."""
        try:
            return SamplingParams(
                n=self.n,
                temperature=self.temperature,
                top_p=self.top_p,
                top_k=0 if self.top_k == -1 else self.top_k,
                max_new_tokens=max_tokens,
                # Unseeded requests differ from one another, as with vLLM.
                seed=random.randrange(2**31) if self.seed is None else self.seed,
                stop=(self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ()),
                logprobs=top_logprobs is not None,
                top_logprobs=top_logprobs or 0,
            )
        except ValidationError as err:
            raise RequestError(400, _problems(err)) from None


class ChatRequest(_Request):
    messages: list[Message]
    max_completion_tokens: MaxNewTokens | None = None  # OpenAI's newer name for max_tokens, preferred if both
    logprobs: bool = False
    top_logprobs: TopLogprobs | None = None

    def params(self) -> SamplingParams:
        if self.top_logprobs and not self.logprobs:
            raise RequestError(400, "top_logprobs needs logprobs set to true")
        limits = (self.max_completion_tokens, self.max_tokens, DEFAULT_MAX_TOKENS)
        max_tokens = next(limit for limit in limits if limit is not None)
        return self.sampling(max_tokens, (self.top_logprobs or 0) if self.logprobs else None)

    def text(self) -> str:
        return "\n".join(m.content for m in self.messages)


class CompletionRequest(_Request):
    prompt: str | list[int]
    logprobs: TopLogprobs | None = None  # how many of the most likely tokens to list at each position
    prompt_logprobs: TopLogprobs | None = None  # vLLM: the same for every prompt token, given the ones before
    echo: Literal[False] = False

    def params(self) -> SamplingParams:
        if not self.prompt:
            raise RequestError(400, "prompt must not be empty")
        return self.sampling(
            DEFAULT_MAX_TOKENS if self.max_tokens is None else self.max_tokens, self.logprobs
        )

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else ""


def parse_request(schema: type[_Request], raw: bytes) -> tuple[_Request, SamplingParams]:
    try:
        request = schema.model_validate_json(raw)
    except ValidationError as err:
        raise RequestError(400, _problems(err)) from None
    return request, request.params()


def _problems(err: ValidationError) -> str:
    """Every problem of a request, `field: what is wrong`, on one line."""
    return "; ".join(f"{dotted(e['loc'])}: {e['msg']}" if e["loc"] else e["msg"] for e in err.errors())


# ---- answers --------------------------------------------------------------------------------------


def _logprob_values(values: np.ndarray) -> list[float]:
    return np.maximum(values.astype(np.float64), MIN_LOGPROB).tolist()


class _InstantPieces(dict):
    """Token texts in instant mode: the fixed completion's own, a placeholder for any other id."""

    def __missing__(self, token_id: int) -> str:
        return f"<{token_id}>"


def fake_logprobs(token_ids: Sequence[int], k: int) -> TokenLogprobs:
    """Well-formed made-up logprobs: each token is the most likely at its position, k distinct
    candidates follow it (ids from 0 up), each a nat less likely than the one before."""
    topk = [[token, *(c for c in range(k + 1) if c != token)][:k] for token in token_ids]
    return TokenLogprobs.build(
        token_ids, [-0.5] * len(token_ids), topk, [[-0.5 - j for j in range(k)] for _ in token_ids]
    )


class Answers:
    """The JSON answers of both endpoints, from completions (and prompt scores) as HFGenerator gives them."""

    def __init__(self, served_name: str, pieces: Sequence[str] | dict[int, str]):
        self.served_name = served_name
        self.pieces = pieces  # token id → its text, decoded once instead of once per position

    def token(self, token_id: int, as_ids: bool) -> str:
        return f"token_id:{token_id}" if as_ids else self.pieces[token_id]

    def chat(self, request: ChatRequest, prompt_tokens: int, completions: list[Completion]) -> dict:
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": self._chat_logprobs(c.logprobs, request.return_tokens_as_token_ids)
                if c.logprobs is not None
                else None,
                "finish_reason": c.finish_reason,
            }
            for i, c in enumerate(completions)
        ]
        return self._envelope("chatcmpl", "chat.completion", choices, prompt_tokens, completions)

    def completion(
        self,
        request: CompletionRequest,
        prompt: list[int],
        completions: list[Completion],
        prompt_scores: TokenLogprobs | None,  # of prompt[1:]; None when not asked for or nothing to score
    ) -> dict:
        as_ids = request.return_tokens_as_token_ids
        prompt_logprobs = None
        if request.prompt_logprobs is not None:
            prompt_logprobs = [
                None,
                *(self._prompt_logprobs(prompt, prompt_scores) if prompt_scores is not None else []),
            ]
        choices = [
            {
                "index": i,
                "text": c.text,
                "logprobs": self._completion_logprobs(c.logprobs, as_ids) if c.logprobs is not None else None,
                "finish_reason": c.finish_reason,
                "prompt_logprobs": prompt_logprobs,
            }
            for i, c in enumerate(completions)
        ]
        return self._envelope("cmpl", "text_completion", choices, len(prompt), completions)

    def _envelope(self, prefix: str, kind: str, choices: list, prompt_tokens: int, completions) -> dict:
        completion_tokens = sum(c.completion_tokens for c in completions)
        return {
            "id": f"{prefix}-{uuid.uuid4().hex}",
            "object": kind,
            "created": int(time.time()),
            "model": self.served_name,
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

    def _chat_logprobs(self, scores: TokenLogprobs, as_ids: bool) -> dict:
        def entry(token_id: int, logprob: float) -> dict:
            token = self.token(token_id, as_ids)
            return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

        content = []
        for token_id, logprob, top_ids, top_logprobs in zip(
            scores.token_ids.tolist(),
            _logprob_values(scores.logprobs),
            scores.topk_ids.tolist(),
            _logprob_values(scores.topk_logprobs),
            strict=True,
        ):
            content.append(
                {
                    **entry(token_id, logprob),
                    "top_logprobs": [entry(i, lp) for i, lp in zip(top_ids, top_logprobs, strict=True)],
                }
            )
        return {"content": content}

    def _completion_logprobs(self, scores: TokenLogprobs, as_ids: bool) -> dict:
        tokens, offsets, tops = [], [], []
        offset = 0
        logprobs = _logprob_values(scores.logprobs)
        for token_id, logprob, top_ids, top_logprobs in zip(
            scores.token_ids.tolist(),
            logprobs,
            scores.topk_ids.tolist(),
            _logprob_values(scores.topk_logprobs),
            strict=True,
        ):
            token = self.token(token_id, as_ids)
            top = {self.token(i, as_ids): lp for i, lp in zip(top_ids, top_logprobs, strict=True)}
            top.setdefault(token, logprob)  # the sampled token is always listed (so up to k + 1 entries)
            tokens.append(token)
            tops.append(top)
            offsets.append(offset)
            offset += len(self.pieces[token_id])  # offsets into the text, whatever form the tokens take
        return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets}

    def _prompt_logprobs(self, prompt: list[int], scores: TokenLogprobs) -> list[dict]:
        """vLLM's prompt_logprobs after the first token (which has none): keyed by token id, the top k
        at each position and the prompt's own token. Ranks within the top k are exact; a prompt token
        outside it is given rank k + 1, a lower bound (its true rank is not computed)."""
        entries = []
        for token_id, logprob, top_ids, top_logprobs in zip(
            prompt[1:],
            _logprob_values(scores.logprobs),
            scores.topk_ids.tolist(),
            _logprob_values(scores.topk_logprobs),
            strict=True,
        ):
            entry = {
                str(i): {"logprob": lp, "rank": rank, "decoded_token": self.pieces[i]}
                for rank, (i, lp) in enumerate(zip(top_ids, top_logprobs, strict=True), start=1)
            }
            entry.setdefault(
                str(token_id),
                {"logprob": logprob, "rank": scores.k + 1, "decoded_token": self.pieces[token_id]},
            )
            entries.append(entry)
        return entries


def _encode(answer: dict) -> bytes:
    return json.dumps(answer, separators=(",", ":")).encode()


# ---- the server -----------------------------------------------------------------------------------


class OpenAIServer:
    """One model (or none, in instant mode) behind vLLM's OpenAI-compatible API; start once, stop once."""

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        served_name: str = "test-model",
        faults: Faults | None = None,
        api_key: str | None = None,
        instant: bool = False,
        logprobs_mode: str = "raw_logprobs",
        pace: Pace | None = None,
    ):
        if (model is None) != instant:
            raise ValueError("give a model, or instant=True without one")
        if logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(
                f"logprobs_mode must be one of {', '.join(LOGPROBS_MODES)}, got {logprobs_mode!r}"
            )
        self.logprobs_mode = logprobs_mode
        self.served_name = served_name
        self.faults = faults or Faults()
        self.pace = pace or Pace()
        self._slots: asyncio.Semaphore | None = None  # made on the server's loop (`start`)
        self.api_key = api_key
        self.instant = instant
        self.fault_counts: Counter[str] = Counter()  # injected faults by kind ("poison" included)
        self.requests = 0  # completion requests received, failed ones included
        self.base_url = ""
        self._attempts: Counter[str] = Counter()  # request body hash → times seen
        self._runner: web.AppRunner | None = None
        if instant:
            self.generator = None
            self._executor = None
            self.answers = Answers(served_name, _InstantPieces(INSTANT_PIECES))
            self._instant_cache: dict[tuple, bytes] = {}
        else:
            self.generator = HFGenerator(model)
            tokenizer = self.generator.tokenizer
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="openai-server-model")
            self.answers = Answers(served_name, tokenizer.batch_decode([[i] for i in range(len(tokenizer))]))

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        if self.pace.capacity:
            self._slots = asyncio.Semaphore(self.pace.capacity)
        middlewares = [self._authenticate] if self.api_key else []
        # Request bodies carry whole prompts as token ids: allow more than aiohttp's 1 MiB.
        app = web.Application(middlewares=middlewares, client_max_size=64 * 2**20)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        # handler_cancellation: a request whose client went away (after a hang, say) stops there.
        self._runner = web.AppRunner(
            app, access_log=None, handler_cancellation=True, shutdown_timeout=STOP_GRACE_SECONDS
        )
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port).start()
        bound_host, bound_port = self._runner.addresses[0][:2]
        self.base_url = f"http://{bound_host}:{bound_port}/v1"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._executor is not None:
            await asyncio.to_thread(self._executor.shutdown, cancel_futures=True)

    # ---- handlers -----------------------------------------------------------------------------
    @web.middleware
    async def _authenticate(self, request: web.Request, handler) -> web.StreamResponse:
        expected = f"Bearer {self.api_key}".encode()
        given = request.headers.get("Authorization", "").encode()
        if request.path.startswith("/v1/") and not hmac.compare_digest(given, expected):
            return error_response(401, "invalid or missing API key", "authentication_error")
        return await handler(request)

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response()

    async def _models(self, request: web.Request) -> web.Response:
        model = {"id": self.served_name, "object": "model", "created": 0, "owned_by": "reasondistill"}
        return web.json_response({"object": "list", "data": [model]})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, ChatRequest)

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, CompletionRequest)

    async def _serve(self, request: web.Request, schema: type[_Request]) -> web.StreamResponse:
        self.requests += 1
        raw = await request.read()
        try:
            body, sampling = parse_request(schema, raw)
            if body.model is not None and body.model != self.served_name:
                raise RequestError(404, f"The model `{body.model}` does not exist.", "not_found_error")
        except RequestError as err:
            return err.response()

        fault = self._fault(raw, body)
        if fault is not None:
            self.fault_counts[fault] += 1
        if fault in ("500", "poison"):
            return error_response(500, f"injected fault: {fault}", "internal_server_error")
        if fault == "429":
            return error_response(
                429,
                "injected fault: rate limited",
                "rate_limit_error",
                {"Retry-After": self.faults.retry_after},
            )
        if fault == "malformed":
            return web.Response(body=MALFORMED_BODY, content_type="application/json")
        if fault == "drop":
            if request.transport is not None:
                request.transport.abort()
            # aiohttp finds the transport closed and sends nothing: the client sees the connection end.
            return web.Response()
        if fault == "hang":
            await asyncio.sleep(self.faults.hang_seconds)
        if self.pace.latency:
            async with self._slots or contextlib.nullcontext():
                await asyncio.sleep(self.pace.seconds(raw))

        try:
            if self.instant:
                payload = self._instant(body, sampling)
            else:
                loop = asyncio.get_running_loop()
                payload = await loop.run_in_executor(self._executor, self._generate, body, sampling)
        except RequestError as err:
            return err.response()
        return web.Response(body=payload, content_type="application/json")

    def _fault(self, raw: bytes, body: _Request) -> str | None:
        if self.faults.poison and self.faults.poison in body.text():
            return "poison"
        if not self.faults.rate:
            return None
        # The same request sent again (a client's retry) has the same key, however its JSON is laid out.
        canonical = json.dumps(json.loads(raw), sort_keys=True, separators=(",", ":"))
        key = hashlib.sha256(canonical.encode()).hexdigest()
        attempt = self._attempts[key]
        self._attempts[key] += 1
        return self.faults.decide(key, attempt)

    # ---- completions ----------------------------------------------------------------------------
    def _generate(self, body: _Request, sampling: SamplingParams) -> bytes:
        """Runs on the model thread: tokenize, generate, score the prompt if asked, and encode."""
        generator = self.generator
        tokenizer = generator.tokenizer
        if isinstance(body, ChatRequest):
            prompt = prompt_ids(tokenizer, [body.messages])[0]
        elif isinstance(body.prompt, str):
            prompt = tokenizer(body.prompt, add_special_tokens=False)["input_ids"]
        else:
            prompt = body.prompt
            if not all(0 <= i < len(tokenizer) for i in prompt):
                raise RequestError(400, f"prompt token ids must be in [0, {len(tokenizer)})")
        context = getattr(generator.model.config, "max_position_embeddings", None)
        if context is not None and len(prompt) + sampling.max_new_tokens > context:
            raise RequestError(
                400,
                f"This model's maximum context length is {context} tokens. However, you requested "
                f"{len(prompt) + sampling.max_new_tokens} tokens ({len(prompt)} in the prompt, "
                f"{sampling.max_new_tokens} in the completion).",
            )
        completions = generator.generate_ids([prompt], sampling)[0]
        if self.logprobs_mode == "processed_logprobs" and sampling.wants_logprobs and not sampling.greedy:
            # vLLM's processed logprobs: after the temperature (greedy decoding applies none)
            processed = generator._distributions(
                [prompt] * len(completions),
                [c.token_ids for c in completions],
                sampling.top_logprobs,
                None,
                temperature=sampling.temperature,
            )
            completions = [replace(c, logprobs=lp) for c, lp in zip(completions, processed, strict=True)]
        if isinstance(body, ChatRequest):
            return _encode(self.answers.chat(body, len(prompt), completions))
        scores = None
        if body.prompt_logprobs is not None and len(prompt) > 1:
            # One forward pass over the prompt: token i scored given the tokens before it.
            scores = generator.score_ids([prompt[:1]], [prompt[1:]], top_k=body.prompt_logprobs)[0]
        return _encode(self.answers.completion(body, prompt, completions, scores))

    def _instant(self, body: _Request, sampling: SamplingParams) -> bytes:
        """The fixed completion. An answer that depends only on the request's shape is encoded once
        (its id and timestamp repeat: it is a fake); prompt logprobs depend on the prompt's tokens."""
        token_prompt = isinstance(body, CompletionRequest) and isinstance(body.prompt, list)
        prompt = body.prompt if token_prompt else list(range(INSTANT_PROMPT_TOKENS))
        prompt_logprobs = body.prompt_logprobs if isinstance(body, CompletionRequest) else None
        as_ids = body.return_tokens_as_token_ids
        shape = (type(body), len(prompt), sampling.n, sampling.wants_logprobs, sampling.top_logprobs, as_ids)
        if prompt_logprobs is None and shape in self._instant_cache:
            return self._instant_cache[shape]
        ids = list(INSTANT_PIECES)
        completion = Completion(
            text="".join(INSTANT_PIECES.values()),
            token_ids=ids,
            finish_reason="stop",
            prompt_tokens=len(prompt),
            completion_tokens=len(ids),
            logprobs=fake_logprobs(ids, sampling.top_logprobs) if sampling.wants_logprobs else None,
        )
        completions = [completion] * sampling.n
        if isinstance(body, ChatRequest):
            return self._instant_cache.setdefault(
                shape, _encode(self.answers.chat(body, len(prompt), completions))
            )
        if prompt_logprobs is None:
            return self._instant_cache.setdefault(
                shape, _encode(self.answers.completion(body, prompt, completions, None))
            )
        scores = fake_logprobs(prompt[1:], prompt_logprobs) if len(prompt) > 1 else None
        return _encode(self.answers.completion(body, prompt, completions, scores))


@contextmanager
def serve_in_thread(
    model: str | Path | None = None, *, host: str = "127.0.0.1", port: int = 0, **options
) -> Iterator[OpenAIServer]:
    """Run an `OpenAIServer(model, **options)` on its own event loop in a background thread; the server
    is listening (`base_url` set) when it is yielded, and stopped on exit."""
    server = OpenAIServer(model, **options)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="openai-server", daemon=True)
    thread.start()
    try:
        asyncio.run_coroutine_threadsafe(server.start(host, port), loop).result()
        yield server
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result()
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()


def spawn_server(*options: str, timeout: float = 120.0) -> tuple[subprocess.Popen, str]:
    """This server in a process of its own, started with these command-line options (`--port 0`
    unless given); returns the process, once it listens, and its base URL. The caller stops it."""
    port = [] if "--port" in options else ["--port", "0"]
    process = subprocess.Popen(
        [sys.executable, "-m", "reasondistill.testing.server", *options, *port],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    ready = threading.Timer(timeout, process.kill)  # a server that never says it listens is stopped
    ready.start()
    try:
        line = process.stdout.readline()
    finally:
        ready.cancel()
    if not line.startswith("listening on "):
        process.kill()
        process.wait()
        raise RuntimeError(f"the test server did not start ({' '.join(options)}): {line!r}")
    return process, line.split()[-1]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m reasondistill.testing.server", description=__doc__.split("\n")[0]
    )
    served = parser.add_mutually_exclusive_group(required=True)
    served.add_argument(
        "--model", help="model folder, Hub id, or testbed:teacher / testbed:student (built on first use)"
    )
    served.add_argument("--instant", action="store_true", help="no model: a fixed completion, at once")
    parser.add_argument("--served-name", default="test-model", help="the model name requests must use")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: any free port (printed)")
    parser.add_argument("--faults-rate", type=float, default=0.0, help="share of attempts that fail")
    parser.add_argument("--faults-kinds", default=",".join(FAULT_KINDS), help="comma-separated fault kinds")
    parser.add_argument("--faults-seed", type=int, default=0)
    parser.add_argument("--retry-after", default="1", help="Retry-After header of 429 answers")
    parser.add_argument("--hang-seconds", type=float, default=30.0)
    parser.add_argument("--max-faults-per-request", type=int, default=2)
    parser.add_argument("--poison", help="requests whose prompt contains this text always fail (500)")
    parser.add_argument("--api-key-env", help="environment variable holding the API key requests must send")
    parser.add_argument(
        "--latency", type=float, default=0.0, help="seconds each answer takes (on top of the model)"
    )
    parser.add_argument("--capacity", type=int, help="requests served at once; the others queue")
    parser.add_argument(
        "--slow-share", type=float, default=0.0, help="share of requests that take --slow-factor × latency"
    )
    parser.add_argument("--slow-factor", type=float, default=20.0)
    parser.add_argument(
        "--logprobs-mode",
        choices=LOGPROBS_MODES,
        default="raw_logprobs",
        help="as vLLM's: processed_logprobs reports the temperature-scaled distribution",
    )
    args = parser.parse_args(argv)

    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            parser.error(f"--api-key-env: ${args.api_key_env} is not set")
    try:
        faults = Faults(
            rate=args.faults_rate,
            kinds=tuple(kind.strip() for kind in args.faults_kinds.split(",") if kind.strip()),
            retry_after=args.retry_after,
            hang_seconds=args.hang_seconds,
            max_faults_per_request=args.max_faults_per_request,
            poison=args.poison,
            seed=args.faults_seed,
        )
        pace = Pace(args.latency, args.capacity, args.slow_share, args.slow_factor)
    except ValueError as err:
        parser.error(str(err))
    model = args.model
    if model is not None and model.startswith(TESTBED_PREFIX):
        model = resolve_testbed_model(model)  # built on first use
    server = OpenAIServer(
        model,
        served_name=args.served_name,
        faults=faults,
        api_key=api_key,
        instant=args.instant,
        logprobs_mode=args.logprobs_mode,
        pace=pace,
    )
    asyncio.run(_serve_until_signalled(server, args.host, args.port))


async def _serve_until_signalled(server: OpenAIServer, host: str, port: int) -> None:
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    await server.start(host, port)
    print(f"listening on {server.base_url}", flush=True)
    try:
        await stopping.wait()
    finally:
        await server.stop()


if __name__ == "__main__":
    main()
