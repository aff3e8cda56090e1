"""Client overhead of the `openai` backend: requests/s at concurrency 64 against an instant server.

The server (`python -m reasondistill.testing.server --instant`) runs in its own process and answers
every request at once with a fixed completion, so what is measured is the client: building
requests, HTTP, parsing answers, retry bookkeeping. Baseline, measured in the same run against the
same server: the official `openai` SDK (`AsyncOpenAI`, its own retries off) with the same
concurrency, parsing the same fields. Target: >= 300 requests/s on 2 CPU cores.

    .venv/bin/python benchmarks/openai_client.py [--requests 3000] [--concurrency 64] [--logprobs 20]
"""

from __future__ import annotations

import argparse
import asyncio
import time

from reasondistill.generate.base import SamplingParams
from reasondistill.generate.openai import OpenAIGenerator
from reasondistill.records import Message
from reasondistill.testing.server import spawn_server


def reasondistill_client(base_url: str, requests: int, concurrency: int, top_logprobs: int) -> float:
    client = OpenAIGenerator("instant", base_url, concurrency=concurrency)
    prompts = [[Message(role="user", content=f"What is {i} + {i}?")] for i in range(requests)]
    sampling = SamplingParams(temperature=0.7, max_new_tokens=8, top_logprobs=top_logprobs)
    started = time.perf_counter()
    results = client.generate(prompts, sampling)
    elapsed = time.perf_counter() - started
    assert sum(len(r) for r in results) == requests and client.usage.failures == 0
    return requests / elapsed


def sdk_client(base_url: str, requests: int, concurrency: int, top_logprobs: int) -> float:
    from openai import AsyncOpenAI

    async def run() -> float:
        client = AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0)
        slots = asyncio.Semaphore(concurrency)
        extra = {"logprobs": True, "top_logprobs": top_logprobs} if top_logprobs else {}

        async def one(i: int) -> str:
            async with slots:
                answer = await client.chat.completions.create(
                    model="instant",
                    messages=[{"role": "user", "content": f"What is {i} + {i}?"}],
                    temperature=0.7,
                    max_completion_tokens=8,
                    seed=i,
                    extra_body={"return_tokens_as_token_ids": True} if top_logprobs else None,
                    **extra,
                )
            return answer.choices[0].message.content

        started = time.perf_counter()
        texts = await asyncio.gather(*(one(i) for i in range(requests)))
        elapsed = time.perf_counter() - started
        await client.close()
        assert len(texts) == requests
        return requests / elapsed

    return asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--logprobs", type=int, default=20, help="top logprobs per token (0: none)")
    args = parser.parse_args()
    server, base_url = spawn_server("--instant", "--served-name", "instant")
    try:
        print(f"{args.requests} requests, concurrency {args.concurrency}, server {base_url} (instant)")
        for top in sorted({0, args.logprobs}):
            ours = reasondistill_client(base_url, args.requests, args.concurrency, top)
            baseline = sdk_client(base_url, args.requests, args.concurrency, top)
            label = f"top_logprobs={top}" if top else "no logprobs"
            print(
                f"{label:>16}: reasondistill {ours:7.0f} req/s | openai SDK {baseline:7.0f} req/s | "
                f"ratio {ours / baseline:.2f}x | target 300 req/s {'met' if ours >= 300 else 'NOT met'}"
            )
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
