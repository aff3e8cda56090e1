"""Memory of a training run's stored teacher: the rows laid out in a memory-mapped file
(`train/stored_teacher.py`) against the previous code, which read the whole store into a dictionary
and built every example's rows in memory before training.

A store of `--traces` traces of `--tokens` completion tokens at top-`--top-k` is written as a score
step writes it (files of 256 traces). Each way then runs in a fresh process: it lays the rows out
for the examples (one per trace, after a `--prompt`-token prompt) and reads every example's rows
once, as batches would. Reported per way: the peak of the process's private memory (RssAnon,
sampled every 5 ms: the memory no other process can share and the kernel cannot reclaim) above what
it held before, the file pages it had mapped (RssFile: page cache, shared
by the processes of a job and reclaimable), and the seconds to lay out and to read.

    .venv/bin/python benchmarks/stored_teacher_memory.py [--traces 2048] [--tokens 1024] [--top-k 20] [--quick]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from reasondistill.generate.logprobs import TokenLogprobs, logprobs_file, read_logprobs, write_logprobs
from reasondistill.objectives.base import IGNORE_INDEX
from reasondistill.records import TrainingExample
from reasondistill.train.data import SparseTeacherRows, TokenizedExample
from reasondistill.train.stored_teacher import StoredTeacher, TeacherRows, write_teacher_rows

BASELINE = "previous code: the whole store in memory"
OURS = "reasondistill: memory-mapped rows"
SHARD = 256


def memory_kib() -> dict[str, int]:
    """RssAnon and RssFile of this process (KiB)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return {name: int(fields[name].split()[0]) for name in ("RssAnon", "RssFile")}


def trace(rng: np.random.Generator, tokens: int, k: int) -> TokenLogprobs:
    return TokenLogprobs(
        token_ids=rng.integers(0, 150_000, tokens, dtype=np.int32),
        logprobs=rng.uniform(-5, 0, tokens).astype(np.float16),
        topk_ids=rng.integers(0, 150_000, (tokens, k), dtype=np.int32),
        topk_logprobs=(-np.sort(rng.exponential(2.0, (tokens, k)), axis=1)).astype(np.float16),
        tail_logprob=rng.uniform(-9, -1, tokens).astype(np.float16),
    )


def write_store(directory: Path, traces: int, tokens: int, k: int) -> list[Path]:
    rng = np.random.default_rng(0)
    files = []
    for shard, first in enumerate(range(0, traces, SHARD)):
        files.append(logprobs_file(directory, shard))
        write_logprobs(
            files[-1], [(f"p{i}", 0, trace(rng, tokens, k)) for i in range(first, min(first + SHARD, traces))]
        )
    return files


def examples_of(files: list[Path], prompt: int) -> tuple[list[TrainingExample], list[TokenizedExample]]:
    """One example per stored trace, its completion the trace's tokens (read from the token ids alone)."""
    import pyarrow.parquet as pq

    examples, tokenized = [], []
    for path in files:
        table = pq.read_table(path, columns=["problem_id", "token_ids"])
        for problem_id, ids in zip(table.column(0).to_pylist(), table.column(1).to_pylist(), strict=True):
            examples.append(
                TrainingExample(problem_id=problem_id, task="t", messages=[], completion="", sample_idx=0)
            )
            tokenized.append(
                TokenizedExample(list(range(prompt)) + ids, [IGNORE_INDEX] * prompt + ids, prompt + len(ids))
            )
    return examples, tokenized


def previous_layout(examples, tokenized, files):
    """What the train stage and trainer did before: every trace decoded into a dictionary, then every
    example's rows built in memory."""
    store = {(p, s): d for path in files for p, s, d in read_logprobs(path)}
    rows = []
    for example, tokens in zip(examples, tokenized, strict=True):
        start = tokens.prompt_length
        rows.append(
            SparseTeacherRows.on_positions(
                store[(example.problem_id, 0)], start, len(tokens.input_ids) - start
            )
        )
    return rows


def mapped_layout(examples, tokenized, files, path: Path):
    write_teacher_rows(examples, tokenized, StoredTeacher.from_files(files, "benchmark store"), path)
    return TeacherRows(path)


def child(way: str, directory: Path, prompt: int) -> None:
    """One way, in this fresh process: prints `anon_kib file_kib layout_s read_s`, the memory peaks
    above what the process held before (sampled every 5 ms)."""
    files = sorted(directory.glob("logprobs-*.parquet"))
    examples, tokenized = examples_of(files, prompt)
    before = memory_kib()
    peak, done = dict(before), threading.Event()

    def sample() -> None:
        while not done.wait(0.005):
            for name, value in memory_kib().items():
                peak[name] = max(peak[name], value)

    sampler = threading.Thread(target=sample)
    sampler.start()
    started = time.perf_counter()
    if way == "previous":
        rows = previous_layout(examples, tokenized, files)
    else:
        rows = mapped_layout(examples, tokenized, files, directory / "rows.arrow")
    laid_out = time.perf_counter()
    positions = sum(len(rows[i].tail_logprob) for i in range(len(rows)))  # as batches copy them out
    read = time.perf_counter()
    time.sleep(0.02)
    done.set()
    sampler.join()
    assert positions == sum(len(t.input_ids) for t in tokenized)
    print(
        peak["RssAnon"] - before["RssAnon"],
        peak["RssFile"] - before["RssFile"],
        laid_out - started,
        read - laid_out,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--traces", type=int, default=2048)
    parser.add_argument("--tokens", type=int, default=1024, help="completion tokens per trace")
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens per example")
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None, help="(unused: no model runs)")
    parser.add_argument("--quick", action="store_true", help="64 traces of 128 tokens (a smoke test)")
    parser.add_argument("--child", choices=["previous", "mapped"], help=argparse.SUPPRESS)
    parser.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.dir, args.prompt)
        return
    if args.quick:
        args.traces, args.tokens = 64, 128
    with tempfile.TemporaryDirectory() as tmp:
        files = write_store(Path(tmp), args.traces, args.tokens, args.top_k)
        on_disk = sum(p.stat().st_size for p in files)
        tokens = args.traces * args.tokens
        print(
            f"store: {args.traces} traces x {args.tokens} tokens, k={args.top_k}, {len(files)} files, "
            f"{on_disk / 2**20:.1f} MiB on disk ({on_disk / tokens:.0f} B/token); prompt {args.prompt} tokens"
        )
        print(f"{'':44s} {'private MiB':>12s} {'mapped MiB':>11s} {'layout s':>9s} {'read s':>7s}")
        results = {}
        for label, way in ((OURS, "mapped"), (BASELINE, "previous")):
            done = subprocess.run(
                [sys.executable, __file__, "--child", way, "--dir", tmp, "--prompt", str(args.prompt)],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            anon, mapped, layout, read = (float(v) for v in done.stdout.split())
            results[way] = anon
            print(f"{label:44s} {anon / 1024:12.1f} {mapped / 1024:11.1f} {layout:9.2f} {read:7.2f}")
        print(f"private memory: {results['mapped'] / max(results['previous'], 1):.3f}x the previous code's")


if __name__ == "__main__":
    main()
