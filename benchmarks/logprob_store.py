"""Bytes per token of the sparse top-k teacher store against dense float16 logits and against the
store's first format, and the error the store makes in a KD loss.

Baselines, in one run on the same logits: (1) the teacher's full next-token logits in float16, 2·V
bytes per token (303,872 for Qwen's 151,936-token vocabulary), on disk with the same parquet
compression; (2) the first format of the top-k store (float16 top-k log-probabilities, int32 ids,
zstd: what `write_logprobs` wrote before), written here as it was. The current store quantises the
top-k log-probabilities relative to the top-1 (1/256 nat) and byte-stream-splits ids and steps (see
generate/logprobs.py). Loss error: the per-token forward KL(p_T ‖ p_S) over top-k + tail against a
random student, from the stored values vs the exact float32 ones, for both formats (max and mean
absolute difference), beside the bound `store_error` gives.

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

from reasondistill.generate.logprobs import TokenLogprobs, from_logits, read_logprobs, write_logprobs
from reasondistill.objectives.divergences import kl_teacher_student, shared_support
from reasondistill.objectives.heads import SparseTargets

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


def first_format(path: Path, rows: list[tuple[str, int, TokenLogprobs]]) -> None:
    """The store as the first format wrote it: float16 top-k log-probabilities, default encodings."""
    columns = {
        "problem_id": pa.array([r[0] for r in rows]),
        "sample_idx": pa.array([r[1] for r in rows], pa.int32()),
        "k": pa.array([r[2].k for r in rows], pa.int32()),
    }
    for name, dtype in (("token_ids", pa.int32()), ("logprobs", pa.float16()), ("topk_ids", pa.int32()),
                        ("topk_logprobs", pa.float16()), ("tail_logprob", pa.float16())):  # fmt: skip
        columns[name] = pa.array([getattr(r[2], name).ravel() for r in rows], pa.list_(dtype))
    pq.write_table(pa.table(columns), path, compression="zstd")


def forward_kl(student_logits: torch.Tensor, ids: np.ndarray, logprobs: np.ndarray, tail: np.ndarray):
    targets = SparseTargets(
        torch.tensor(ids, dtype=torch.long),
        torch.tensor(logprobs, dtype=torch.float32),
        torch.tensor(tail, dtype=torch.float32),
    )
    return kl_teacher_student(*shared_support(student_logits, targets))


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
        print(
            f"{'k':>4} {'B/token':>8} {'first fmt':>10} {'ratio':>6} {'vs dense':>9} {'encode tok/s':>13}"
            f" {'KL error max / mean (first fmt)':>34} {'bound max':>10}"
        )
        for k in (20, 32, 64):
            rows, exact, encoding = [], [], 0.0
            for row in range(args.tokens // TOKENS_PER_ROW):
                logits = lm_like_logits(generator, TOKENS_PER_ROW, args.vocab)
                tokens = logits.argmax(-1)
                started = time.perf_counter()
                rows.append((f"p{row}", 0, from_logits(logits, tokens, k)))
                encoding += time.perf_counter() - started
                exact.append(torch.log_softmax(logits, -1).topk(k, -1).values)  # the float32 values
            encode_rate = args.tokens / encoding
            write_logprobs(directory / f"top{k}.parquet", rows)
            first_format(directory / f"first{k}.parquet", rows)
            per_token = (directory / f"top{k}.parquet").stat().st_size / args.tokens
            first = (directory / f"first{k}.parquet").stat().st_size / args.tokens
            errors, losses = {"store": [], "first": []}, []
            bound = 0.0
            student = torch.randn(TOKENS_PER_ROW, args.vocab, generator=generator) * 2
            for (_, _, written), (_, _, read), values in zip(
                rows, read_logprobs(directory / f"top{k}.parquet"), exact, strict=True
            ):
                reference = forward_kl(student, written.topk_ids, values.numpy(), written.tail_logprob)
                losses.append(reference)
                for name, stored in (("store", read), ("first", written)):
                    kl = forward_kl(student, stored.topk_ids, stored.topk_logprobs, stored.tail_logprob)
                    errors[name].append((kl - reference).abs())
                gap = (read.topk_logprobs.astype(np.float32) - values.numpy()).__abs__().max()
                bound = max(bound, float(gap))
            store, before = torch.cat(errors["store"]), torch.cat(errors["first"])
            print(
                f"{k:>4} {per_token:>8.1f} {first:>10.1f} {first / per_token:>5.2f}x {dense / per_token:>8.0f}x"
                f" {encode_rate:>13,.0f} {store.max():>10.2e} / {store.mean():.2e}"
                f" ({before.max():.2e} / {before.mean():.2e}) {bound:>10.4f}"
                f"  (mean KL {torch.cat(losses).mean():.2f})"
            )
        print(
            "KL error: |forward KL from the stored values − from the exact float32 ones| per token, nats; "
            "bound max: the largest |stored − exact| top-k log-probability (nats)"
        )


if __name__ == "__main__":
    main()
