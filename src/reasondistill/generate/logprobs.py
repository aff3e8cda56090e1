"""The teacher's token distribution over a completion, stored sparsely: its top-k and the tail mass.

Per completion token t (T tokens, k candidates):

    token_ids[t]         int32    the token the completion has at t
    logprobs[t]          float16  log p(token_t | prompt, tokens_<t)
    topk_ids[t, :]       int32    the k most likely tokens at t, most likely first
    topk_logprobs[t, :]  float16  their log-probabilities
    tail_logprob[t]      float16  log(1 - Σ_j p(topk_ids[t, j])): the mass of the other V - k tokens

That is 6·k + 8 bytes per token before parquet's compression (the benchmark measures the real
figure), against 2·V bytes for dense float16 logits (303,872 for a 151,936-token vocabulary).
The probabilities are the model's own (temperature 1, before any sampling filter), which is what
logit distillation needs, whatever temperature the completion was sampled at.

On disk: one parquet row per completion, keyed by (problem_id, sample_idx), the [T, k] arrays
flattened row-major next to a `k` column.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..errors import UserError

if TYPE_CHECKING:
    import torch

TAIL_FLOOR = -1e4  # log of an (almost) empty tail: float16 keeps it, and exp() of it is 0


@dataclass(frozen=True)
class TokenLogprobs:
    token_ids: np.ndarray  # int32 [T]
    logprobs: np.ndarray  # float16 [T]
    topk_ids: np.ndarray  # int32 [T, k]; k may be 0 when only the completion's own logprobs were asked for
    topk_logprobs: np.ndarray  # float16 [T, k]
    tail_logprob: np.ndarray  # float16 [T]

    @property
    def k(self) -> int:
        return self.topk_ids.shape[1]

    def __len__(self) -> int:
        return len(self.token_ids)

    @staticmethod
    def concat(parts: Sequence[TokenLogprobs], k: int) -> TokenLogprobs:
        """Consecutive stretches of one completion, joined."""
        if not parts:
            return TokenLogprobs.build([], [], np.zeros((0, k)), np.zeros((0, k)))
        return TokenLogprobs(*(np.concatenate([getattr(part, name) for part in parts]) for name in _ARRAYS))

    @staticmethod
    def build(token_ids, logprobs, topk_ids, topk_logprobs) -> TokenLogprobs:
        """From exact values at any precision; computes the tail and casts to the stored dtypes."""
        topk_logprobs = np.asarray(topk_logprobs, dtype=np.float64).reshape(len(token_ids), -1)
        return TokenLogprobs(
            token_ids=np.asarray(token_ids, dtype=np.int32),
            logprobs=np.asarray(logprobs, dtype=np.float16),
            topk_ids=np.asarray(topk_ids, dtype=np.int32).reshape(len(token_ids), -1),
            topk_logprobs=topk_logprobs.astype(np.float16),
            tail_logprob=tail_logprob(topk_logprobs).astype(np.float16),
        )


def tail_logprob(topk_logprobs: np.ndarray) -> np.ndarray:
    """log(1 - Σ exp(topk)) per row, floored where the top-k holds (numerically) all the mass."""
    top_mass = np.exp(topk_logprobs).sum(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        tail = np.log1p(-np.minimum(top_mass, 1.0))
    return np.maximum(np.nan_to_num(tail, nan=TAIL_FLOOR, neginf=TAIL_FLOOR), TAIL_FLOOR)


def from_logits(logits: torch.Tensor, token_ids: torch.Tensor, k: int) -> TokenLogprobs:
    """From a model's next-token logits [T, V] at the completion's positions (a forward pass).

    The tail is computed from the full distribution (logsumexp of the logits outside the top k),
    which stays exact where 1 - Σ top-k would cancel catastrophically.
    """
    import torch  # here: the modules that only read and write the store stay light

    logprobs = torch.log_softmax(logits.float(), dim=-1)
    top = logprobs.topk(k, dim=-1) if k else None
    if top is None:
        tail = torch.zeros(len(token_ids))
    else:
        outside = logprobs.scatter(-1, top.indices, float("-inf"))
        tail = torch.logsumexp(outside, dim=-1).clamp(min=TAIL_FLOOR)
    shape = (len(token_ids), k)
    return TokenLogprobs(
        token_ids=token_ids.cpu().numpy().astype(np.int32),
        logprobs=logprobs.gather(-1, token_ids[:, None])[:, 0].cpu().numpy().astype(np.float16),
        topk_ids=top.indices.cpu().numpy().astype(np.int32) if top else np.zeros(shape, np.int32),
        topk_logprobs=top.values.cpu().numpy().astype(np.float16) if top else np.zeros(shape, np.float16),
        tail_logprob=tail.cpu().numpy().astype(np.float16),
    )


def from_candidates(
    token_ids: Sequence[int], logprobs: Sequence[float], candidates: Sequence[Mapping[int, float]], k: int
) -> TokenLogprobs:
    """From a server's per-position candidates {token id: logprob}, which may hold more than k
    entries (vLLM adds the sampled token to its top k): the k most likely are kept."""
    if len(candidates) != len(token_ids):
        raise ValueError(f"{len(candidates)} candidate lists for {len(token_ids)} tokens")
    topk_ids = np.zeros((len(token_ids), k), np.int32)
    topk_logprobs = np.full((len(token_ids), k), -np.inf)
    for t, position in enumerate(candidates):
        if len(position) < k:
            raise ValueError(f"position {t}: {len(position)} candidates, expected at least {k}")
        best = sorted(position.items(), key=lambda item: -item[1])[:k]
        topk_ids[t] = [token for token, _ in best]
        topk_logprobs[t] = [logprob for _, logprob in best]
    return TokenLogprobs.build(token_ids, logprobs, topk_ids, topk_logprobs)


# ---- storage ------------------------------------------------------------------------------------

_SCHEMA = pa.schema(
    [
        ("problem_id", pa.string()),
        ("sample_idx", pa.int32()),
        ("k", pa.int32()),
        ("token_ids", pa.list_(pa.int32())),
        ("logprobs", pa.list_(pa.float16())),
        ("topk_ids", pa.list_(pa.int32())),
        ("topk_logprobs", pa.list_(pa.float16())),
        ("tail_logprob", pa.list_(pa.float16())),
    ]
)
_ARRAYS = ("token_ids", "logprobs", "topk_ids", "topk_logprobs", "tail_logprob")


def _list_array(arrays: list[np.ndarray], dtype: pa.DataType) -> pa.ListArray:
    offsets = np.concatenate([[0], np.cumsum([a.size for a in arrays])]).astype(np.int32)
    values = np.concatenate([a.ravel() for a in arrays]) if arrays else np.zeros(0)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values.astype(dtype.to_pandas_dtype())))


def logprobs_file(directory: Path, shard: int) -> Path:
    """Where shard `shard` of a generate (beside its traces) or score output keeps its distributions."""
    return directory / f"logprobs-{shard:05d}.parquet"


def write_logprobs(path: Path, rows: Sequence[tuple[str, int, TokenLogprobs]]) -> None:
    """Write (problem_id, sample_idx, distribution) rows as one parquet file, atomically."""
    columns = {
        "problem_id": pa.array([r[0] for r in rows], pa.string()),
        "sample_idx": pa.array([r[1] for r in rows], pa.int32()),
        "k": pa.array([r[2].k for r in rows], pa.int32()),
    }
    for name in _ARRAYS:
        columns[name] = _list_array([getattr(r[2], name) for r in rows], _SCHEMA.field(name).type.value_type)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(pa.table(columns, schema=_SCHEMA), tmp, compression="zstd")
    os.replace(tmp, path)


def stored_tokens(path: Path) -> int:
    """Completion tokens in a logprobs file, from its `token_ids` column alone (no arrays decoded)."""
    return pc.sum(pc.list_value_length(pq.read_table(path, columns=["token_ids"]).column(0))).as_py() or 0


def read_logprobs(path: Path) -> list[tuple[str, int, TokenLogprobs]]:
    """Read a file written by `write_logprobs`, checking that every row's arrays fit its T and k."""
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise UserError(f"{path}: not a readable parquet file ({err})") from None
    missing = [name for name in _SCHEMA.names if name not in table.column_names]
    if missing:
        raise UserError(f"{path}: not a logprobs file; missing columns {', '.join(missing)}")
    columns = {name: table.column(name).combine_chunks() for name in _ARRAYS}
    rows = []
    for i, (problem_id, sample_idx, k) in enumerate(
        zip(*(table.column(c).to_pylist() for c in ("problem_id", "sample_idx", "k")), strict=True)
    ):
        arrays = {name: columns[name][i].values.to_numpy(zero_copy_only=False) for name in _ARRAYS}
        length = len(arrays["token_ids"])
        expected = {
            "logprobs": length,
            "topk_ids": length * k,
            "topk_logprobs": length * k,
            "tail_logprob": length,
        }
        for name, size in expected.items():
            if len(arrays[name]) != size:
                raise UserError(
                    f"{path} row {i}: {name}: expected {size} values ({length} tokens, k={k}), got {len(arrays[name])}"
                )
        for name in ("topk_ids", "topk_logprobs"):
            arrays[name] = arrays[name].reshape(length, k)
        rows.append((problem_id, sample_idx, TokenLogprobs(**arrays)))
    return rows
