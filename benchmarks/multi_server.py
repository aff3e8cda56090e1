"""Rows/s of the `openai` backend spread over 4 rate-limited servers against 1 (goal ≥ 3.5×).

Each server (`python -m reasondistill.testing.server --instant --latency L --capacity C`) runs in its
own process and answers at most C requests at once, each after L seconds (others queue), so one
server caps a job at C / L requests/s however many the client sends. The same client (concurrency
64, the backend's default) sends the same requests to one server, then to four (`--base-url` with four
URLs, balanced by requests in flight), in one run. The ideal ratio is 4; what is lost is the client's
own overhead and the balancing.

    .venv/bin/python benchmarks/multi_server.py [--requests 2000] [--latency 0.05] [--capacity 8]
"""

from __future__ import annotations

import argparse
import time

from reasondistill.generate.base import SamplingParams
from reasondistill.generate.openai import OpenAIGenerator
from reasondistill.records import Message
from reasondistill.testing.server import spawn_server


def rows_per_second(urls: list[str], requests: int, concurrency: int) -> float:
    client = OpenAIGenerator("instant", urls, concurrency=concurrency)
    prompts = [[Message(role="user", content=f"What is {i} + {i}?")] for i in range(requests)]
    started = time.perf_counter()
    results = client.generate(prompts, SamplingParams(temperature=0.7, max_new_tokens=8))
    elapsed = time.perf_counter() - started
    assert sum(len(r) for r in results) == requests and client.usage.failures == 0
    return requests / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--latency", type=float, default=0.05, help="seconds per answer")
    parser.add_argument("--capacity", type=int, default=8, help="answers a server works on at once")
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    pace = ["--latency", str(args.latency), "--capacity", str(args.capacity)]
    servers = [spawn_server("--instant", "--served-name", "instant", *pace) for _ in range(4)]
    try:
        urls = [url for _, url in servers]
        cap = args.capacity / args.latency
        one = rows_per_second(urls[:1], args.requests, args.concurrency)
        four = rows_per_second(urls, args.requests, args.concurrency)
    finally:
        for process, _ in servers:
            process.kill()
            process.wait()
    print(
        f"{args.requests} requests, concurrency {args.concurrency}; each server answers at most {cap:,.0f}/s"
    )
    print(f"1 server:  {one:8,.1f} rows/s")
    print(f"4 servers: {four:8,.1f} rows/s  ({four / one:.2f}x; goal >= 3.5x)")


if __name__ == "__main__":
    main()
