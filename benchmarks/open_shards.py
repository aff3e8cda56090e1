"""A `generate` job's wall time with shards kept in flight together against one shard at a time.

Against one server (`python -m reasondistill.testing.server --instant`) whose answers take `--latency`
seconds, and 20 times that for 5% of requests (a hash of the request: the same ones in both runs),
the same job of 2,000 rows (1,000 testbed problems × 2 samples, shards of 256, concurrency 64) runs
twice in one process: with `--open-shards 1`, the way every shard used to run (its requests drain to
the slowest before the next shard starts), and with the default 4. Goal: ≥ 1.5× faster.

    .venv/bin/python benchmarks/open_shards.py [--problems 1000] [--latency 0.05]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from reasondistill.cli import main as cli
from reasondistill.testing.server import spawn_server


def job_seconds(root: Path, url: str, problems: int, open_shards: int) -> float:
    cli(
        ["problems", "--run-dir", str(root), "--tasks", "arithmetic", "--train", str(problems), "--test", "1"]
    )
    started = time.perf_counter()
    cli([
        "generate", "--run-dir", str(root), "--model", "instant", "--backend", "openai", "--base-url", url,
        "--n", "2", "--temperature", "0.7", "--max-new-tokens", "16", "--shard-size", "256",
        "--concurrency", "64", "--open-shards", str(open_shards),
    ])  # fmt: skip
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--problems", type=int, default=1000)
    parser.add_argument("--latency", type=float, default=0.05, help="median seconds per answer")
    args = parser.parse_args()
    pace = ["--latency", str(args.latency), "--slow-share", "0.05", "--slow-factor", "20"]
    server, url = spawn_server("--instant", "--served-name", "instant", *pace)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            sequential = job_seconds(Path(tmp) / "one", url, args.problems, 1)
            overlapped = job_seconds(Path(tmp) / "four", url, args.problems, 4)
    finally:
        server.kill()
        server.wait()
    rows = 2 * args.problems
    print(f"{rows} rows; answers take {args.latency:g} s, 5% of them {20 * args.latency:g} s")
    print(f"one shard at a time: {sequential:6.1f} s ({rows / sequential:,.0f} rows/s)")
    print(f"4 shards open:       {overlapped:6.1f} s ({rows / overlapped:,.0f} rows/s)  "
          f"{sequential / overlapped:.2f}x faster (goal >= 1.5x)")  # fmt: skip


if __name__ == "__main__":
    main()
