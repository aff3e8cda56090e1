"""Backend options shared by the stages that call a teacher (generate, score, rewrite, chunk, train), and
the factory of generators."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from ..errors import UserError
from ..models import ModelLoading
from .base import Generator
from .shards import Pricing


class BackendOptions(ModelLoading):
    backend: Literal["hf", "openai", "vllm"] = Field(
        "hf", description="hf: transformers; openai: any OpenAI-compatible server; vllm: in-process vLLM"
    )
    base_url: list[str] | None = Field(
        None,
        description="openai: the server, e.g. http://localhost:8000/v1, or several (comma-separated, or "
        "@FILE: one URL per line), balanced by requests in flight (default: $OPENAI_BASE_URL)",
    )
    api_key_env: str = Field(
        "OPENAI_API_KEY",
        description="openai: the environment variable holding the API key (the key is never written anywhere)",
    )
    endpoint: Literal["chat", "completions"] = Field(
        "chat",
        description="openai: /v1/chat/completions, or /v1/completions with the chat template applied here",
    )
    tokenizer: str | None = Field(
        None,
        description="openai: the teacher's tokenizer (folder or Hub id), for the completions endpoint and scoring",
    )
    concurrency: int = Field(64, ge=1, description="openai: requests in flight at once")
    open_shards: int = Field(
        4,
        ge=1,
        description="openai: shards in flight at once, so that the next shard's requests go out while an "
        "earlier one's slowest are still out",
    )
    max_retries: int = Field(8, ge=0, description="openai: retries of a request before it counts as failed")
    request_timeout: float = Field(600.0, gt=0, description="openai: seconds to wait for an answer")
    retry_backoff: float = Field(
        1.0,
        ge=0,
        description="openai: most seconds before the first retry, doubled per retry (up to 60), jittered",
    )
    tensor_parallel_size: int = Field(1, ge=1, description="vllm: GPUs the model is split over")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="vllm: share of GPU memory to use")
    engine_args: dict[str, Any] = Field(
        default_factory=dict,
        description="vllm: further keyword arguments of vllm.LLM, e.g. {enforce_eager: true, max_model_len: 8192}",
    )
    price_per_1m_prompt_tokens: float | None = Field(
        None, ge=0, description="for the cost in manifest and report"
    )
    price_per_1m_completion_tokens: float | None = Field(
        None, ge=0, description="for the cost in manifest and report"
    )
    allow_failures: bool = Field(
        False,
        description="finish the step although some requests failed after their retries (they are listed); "
        "by default the step stops with an error and a rerun retries them",
    )
    compile: bool = Field(
        False,
        description="hf: decoding steps through torch.compile with dynamic shapes (a one-off compile, ~10 s "
        "for the testbed's models on 2 CPU cores, then ~2x faster steps there; logits equal up to their last bits)",
    )

    operational = frozenset(
        {
            "base_url", "api_key_env", "concurrency", "open_shards", "max_retries", "request_timeout", "retry_backoff",
            "gpu_memory_utilization",
            "price_per_1m_prompt_tokens", "price_per_1m_completion_tokens", "allow_failures",
        }
    )  # fmt: skip

    @property
    def pricing(self) -> Pricing:
        return Pricing(self.price_per_1m_prompt_tokens, self.price_per_1m_completion_tokens)

    @model_validator(mode="after")
    def _compile_on_hf(self) -> BackendOptions:
        if self.compile and self.backend != "hf":
            raise ValueError(
                f"compile: for the hf backend only (backend {self.backend}: vLLM compiles its own graphs, "
                "see engine_args; a server is compiled where it runs)"
            )
        return self

    @field_validator("base_url", mode="before")
    @classmethod
    def _urls(cls, value: Any) -> Any:
        """One URL, several comma-separated, or @FILE with one per line (# comments)."""
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            return value
        urls = []
        for item in value:
            if isinstance(item, str) and item.startswith("@"):
                path = Path(item[1:]).expanduser()
                try:
                    lines = path.read_text().splitlines()
                except OSError as err:
                    raise ValueError(f"cannot read the file of server URLs {path} ({err.strerror})") from None
                urls.extend(line.split("#")[0].strip() for line in lines)
            elif isinstance(item, str):
                urls.extend(part.strip() for part in item.split(","))
            else:
                urls.append(item)
        urls = [url for url in urls if url != ""]
        for url in urls:
            if not isinstance(url, str) or not url.startswith(("http://", "https://")):
                raise ValueError(f"{url!r} is not an http(s) URL")
        if not urls:
            raise ValueError("no server URL given")
        if len(set(urls)) != len(urls):
            raise ValueError(f"a server URL is given twice: {', '.join(urls)}")
        return urls

    def server_urls(self) -> list[str]:
        if self.base_url:
            return self.base_url
        if not os.environ.get("OPENAI_BASE_URL"):
            raise UserError(
                "backend openai: set base_url (e.g. http://localhost:8000/v1) or $OPENAI_BASE_URL"
            )
        try:
            return self._urls(os.environ["OPENAI_BASE_URL"])
        except ValueError as err:
            raise UserError(f"$OPENAI_BASE_URL: {err}") from None


def open_generator(
    options: BackendOptions,
    model: str,
    batch_size: int,
    top_logprobs: int,
    gate: tuple[str, float] | None = None,
) -> Generator:
    """`model`: what from_pretrained receives, or for `openai` the name the server knows it by;
    `top_logprobs`: the largest k the step asks for (vLLM sizes its engine for it); `gate`: a student
    and its threshold τ for student-gated decoding (RSD, rsd.py; local models only)."""
    if gate is not None:
        from .rsd import StudentGatedGenerator

        student, threshold = gate
        return StudentGatedGenerator(
            model,
            student,
            threshold=threshold,
            batch_size=batch_size,
            compile=options.compile,
            **options.loading(),
        )
    if options.backend == "openai":
        from .openai import OpenAIGenerator, RetryPolicy

        return OpenAIGenerator(
            model,
            options.server_urls(),
            endpoint=options.endpoint,
            api_key_env=options.api_key_env,
            tokenizer=options.tokenizer,
            concurrency=options.concurrency,
            timeout=options.request_timeout,
            retry=RetryPolicy(max_retries=options.max_retries, backoff_base=options.retry_backoff),
        )
    if options.backend == "vllm":
        from .vllm import VLLMGenerator

        return VLLMGenerator(
            model,
            tensor_parallel_size=options.tensor_parallel_size,
            gpu_memory_utilization=options.gpu_memory_utilization,
            max_logprobs=max(top_logprobs, 20),  # 20: vLLM's own default
            dtype=options.dtype,
            engine_args=options.engine_args,
        )
    from .hf import HFGenerator

    return HFGenerator(model, batch_size=batch_size, compile=options.compile, **options.loading())
