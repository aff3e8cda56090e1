"""Bytes per token of the sparse top-k teacher store against dense float16 logits.

Baseline: storing the teacher's full next-token logits in float16, 2·V bytes per token
(303,872 for Qwen's 151,936-token vocabulary), measured here on disk with the same parquet
compression for a few tokens and then per token. The sparse store keeps int32 ids, float16
logprobs of the top k and of the completion's own token, and a float16 tail mass; the issue's
target is at most 6·k + 16 bytes per token.

Logits are synthetic but shaped like a language model's: a Zipf-like fall-off over a random
permutation of the vocabulary, with a per-position temperature, so the top-k values are as
(in)compressible as real ones.

    .venv/bin/python benchmarks/logprob_store.py [--tokens 4096] [--vocab 151936]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from reasondistill.generate.logprobs import from_logits, write_logprobs

TOKENS_PER_ROW = 512


def lm_like_logits(generator: torch.Generator, tokens: int, vocab: int) -> torch.Tensor:
    ranks = torch.arange(1, vocab + 1, dtype=torch.float32).log()
    sharpness = torch.empty(tokens, 1).uniform_(0.8, 3.0, generator=generator)
    logits = -sharpness * ranks + torch.randn(tokens, vocab, generator=generator) * 0.3
    # a different ranking of the vocabulary at every position, as a text's next tokens differ
    permutation = torch.randperm(vocab, generator=generator)
    shifts = torch.randint(0, vocab, (tokens, 1), generator=generator)
    return logits.gather(1, (permutation[None, :] + shifts) % vocab)


def dense_bytes_per_token(logits: torch.Tensor, directory: Path) -> float:
    """The baseline on disk: float16 logits, one list per token, zstd like the sparse store."""
    values = logits.half().numpy()
    column = pa.ListArray.from_arrays(
        pa.array(np.arange(0, values.size + 1, values.shape[1], dtype=np.int32)), pa.array(values.ravel())
    )
    path = directory / "dense.parquet"
    pq.write_table(pa.table({"logits": column}), path, compression="zstd")
    return path.stat().st_size / len(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=151_936)
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        dense = dense_bytes_per_token(lm_like_logits(generator, 64, args.vocab), directory)
        print(
            f"dense float16 logits, V={args.vocab:,}: {2 * args.vocab:,} B/token raw, {dense:,.0f} B/token on disk"
        )
        print(f"{'k':>4} {'B/token':>9} {'target 6k+16':>13} {'vs dense':>10} {'encode tok/s':>13}")
        for k in (20, 32, 64):
            rows, encoding = [], 0.0
            for row in range(args.tokens // TOKENS_PER_ROW):
                logits = lm_like_logits(generator, TOKENS_PER_ROW, args.vocab)
                tokens = logits.argmax(-1)
                started = time.perf_counter()
                rows.append((f"p{row}", 0, from_logits(logits, tokens, k)))
                encoding += time.perf_counter() - started
            encode_rate = args.tokens / encoding
            write_logprobs(directory / f"top{k}.parquet", rows)
            per_token = (directory / f"top{k}.parquet").stat().st_size / args.tokens
            print(
                f"{k:>4} {per_token:>9.1f} {6 * k + 16:>13} {dense / per_token:>9.0f}x {encode_rate:>13,.0f}"
            )


if __name__ == "__main__":
    main()
