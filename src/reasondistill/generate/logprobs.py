"""The teacher's token distribution over a completion, stored sparsely: its top-k and the tail mass.

Per completion token t (T tokens, k candidates), in memory (`TokenLogprobs`):

    token_ids[t]         int32    the token the completion has at t
    logprobs[t]          float16  log p(token_t | prompt, tokens_<t)
    topk_ids[t, :]       int32    the k most likely tokens at t, most likely first
    topk_logprobs[t, :]  float16  their log-probabilities
    tail_logprob[t]      float16  log(1 - Σ_j p(topk_ids[t, j])): the mass of the other V - k tokens

The probabilities are the model's own (temperature 1, before any sampling filter), which is what
logit distillation needs, whatever temperature the completion was sampled at.

On disk: one parquet row per completion, keyed by (problem_id, sample_idx), the [T, k] arrays
flattened row-major next to a `k` column. The top-k log-probabilities are stored relative to the
top-1 (format 2): the top-1 as float16, and for the others q_j = round((top1 − log p_j) / STEP), a
non-decreasing count of STEP = 1/256 nats, written as its differences q_j − q_(j−1) (small numbers:
uint16, byte-stream split, zstd). The ids are byte-stream split too (no dictionary: a vocabulary's
ids are nearly all distinct). Decoded, each log-probability is within STEP/2 of the one written plus
float16's own rounding (`store_error`), its rank unchanged; gaps beyond 65,535 steps (256 nats,
probabilities below e^-256) are capped there. That makes about 200 bytes per token at k = 64 where
plain float16 took 372 (benchmarks/logprob_store.py, which also reports the error it makes in a KD
loss); files in the first format (float16 `topk_logprobs`) are still read.
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

    def to_json(self) -> dict:
        """The arrays as lists (float16 values are exact in JSON's decimal form), for a journal."""
        return {name: getattr(self, name).tolist() for name in _ARRAYS}

    @staticmethod
    def from_json(value: dict) -> TokenLogprobs:
        length = len(value["token_ids"])
        k = len(value["topk_ids"][0]) if length else 0
        return TokenLogprobs(
            token_ids=np.asarray(value["token_ids"], np.int32),
            logprobs=np.asarray(value["logprobs"], np.float16),
            topk_ids=np.asarray(value["topk_ids"], np.int32).reshape(length, k),
            topk_logprobs=np.asarray(value["topk_logprobs"], np.float16).reshape(length, k),
            tail_logprob=np.asarray(value["tail_logprob"], np.float16),
        )

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

STEP = 1 / 256  # nats: the quantum of a top-k log-probability below the top-1
MAX_STEPS = 2**16 - 1
FORMAT = "2"


def store_error(logprobs: np.ndarray) -> np.ndarray:
    """The most a decoded top-k log-probability may differ from the float16 value written: STEP/2 of
    quantisation, plus float16's half-step where the decoded value is rounded to float16 again. (The
    top-1 is kept as written.)"""
    magnitude = np.abs(np.asarray(logprobs, dtype=np.float32)) + STEP
    return STEP / 2 + np.spacing(magnitude.astype(np.float16)).astype(np.float32) / 2


def encode_topk(topk_logprobs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[T, k] log-probabilities, most likely first → (top-1 [T] float16, step differences [T, k−1] uint16)."""
    values = np.asarray(topk_logprobs, dtype=np.float32)
    if values.shape[1] == 0:
        return np.zeros(0, np.float16), np.zeros((len(values), 0), np.uint16)
    if (np.diff(values, axis=1) > 1e-3).any():
        raise ValueError("top-k log-probabilities must be sorted, most likely first")
    top = values[:, 0].astype(np.float16)
    below = top.astype(np.float32)[:, None] - values[:, 1:]
    steps = np.clip(np.rint(below / STEP), 0, MAX_STEPS)
    steps = np.maximum.accumulate(steps, axis=1)  # a last-bit tie may round one step back
    return top, np.diff(steps, axis=1, prepend=0).astype(np.uint16)


def decode_topk(top: np.ndarray, gaps: np.ndarray) -> np.ndarray:
    """The inverse of `encode_topk`: [T, k] float16 log-probabilities."""
    if top.size == 0:
        return np.zeros((len(gaps), 0), np.float16)
    below = np.cumsum(gaps.astype(np.int64), axis=1) * STEP
    return np.concatenate([top[:, None], top.astype(np.float64)[:, None] - below], axis=1).astype(np.float16)


_SCHEMA = pa.schema(
    [
        ("problem_id", pa.string()),
        ("sample_idx", pa.int32()),
        ("k", pa.int32()),
        ("token_ids", pa.list_(pa.int32())),
        ("logprobs", pa.list_(pa.float16())),
        ("topk_ids", pa.list_(pa.int32())),
        ("top_logprob", pa.list_(pa.float16())),  # [T] (none when k = 0)
        ("topk_steps", pa.list_(pa.uint16())),  # [T, k − 1]
        ("tail_logprob", pa.list_(pa.float16())),
    ],
    metadata={"reasondistill.logprobs_format": FORMAT, "reasondistill.logprobs_step": str(STEP)},
)
_ARRAYS = ("token_ids", "logprobs", "topk_ids", "topk_logprobs", "tail_logprob")
_FIRST_FORMAT = ("problem_id", "sample_idx", "k", *_ARRAYS)  # float16 topk_logprobs
_SPLIT = ["topk_ids.list.element", "topk_steps.list.element"]  # byte-stream split, no dictionary


def _list_array(arrays: list[np.ndarray], dtype: pa.DataType) -> pa.ListArray:
    offsets = np.concatenate([[0], np.cumsum([a.size for a in arrays])]).astype(np.int32)
    values = np.concatenate([a.ravel() for a in arrays]) if arrays else np.zeros(0)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values.astype(dtype.to_pandas_dtype())))


def logprobs_file(directory: Path, shard: int) -> Path:
    """Where shard `shard` of a generate (beside its traces) or score output keeps its distributions."""
    return directory / f"logprobs-{shard:05d}.parquet"


def write_logprobs(path: Path, rows: Sequence[tuple[str, int, TokenLogprobs]]) -> None:
    """Write (problem_id, sample_idx, distribution) rows as one parquet file, atomically."""
    encoded = [encode_topk(r[2].topk_logprobs) for r in rows]
    arrays = {
        "token_ids": [r[2].token_ids for r in rows],
        "logprobs": [r[2].logprobs for r in rows],
        "topk_ids": [r[2].topk_ids for r in rows],
        "top_logprob": [top for top, _ in encoded],
        "topk_steps": [steps for _, steps in encoded],
        "tail_logprob": [r[2].tail_logprob for r in rows],
    }
    columns = {
        "problem_id": pa.array([r[0] for r in rows], pa.string()),
        "sample_idx": pa.array([r[1] for r in rows], pa.int32()),
        "k": pa.array([r[2].k for r in rows], pa.int32()),
        **{name: _list_array(values, _SCHEMA.field(name).type.value_type) for name, values in arrays.items()},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(
        pa.table(columns, schema=_SCHEMA),
        tmp,
        compression="zstd",
        use_dictionary=[n for n in _SCHEMA.names if n not in ("topk_ids", "topk_steps")],
        column_encoding={name: "BYTE_STREAM_SPLIT" for name in _SPLIT},
    )
    os.replace(tmp, path)


def stored_tokens(path: Path) -> int:
    """Completion tokens in a logprobs file, from its `token_ids` column alone (no arrays decoded)."""
    return pc.sum(pc.list_value_length(pq.read_table(path, columns=["token_ids"]).column(0))).as_py() or 0


def read_logprobs(path: Path) -> list[tuple[str, int, TokenLogprobs]]:
    """Read a file written by `write_logprobs` (either format), checking that every row's arrays fit its
    T and k."""
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise UserError(f"{path}: not a readable parquet file ({err})") from None
    first_format = "topk_logprobs" in table.column_names
    expected_columns = _FIRST_FORMAT if first_format else _SCHEMA.names
    missing = [name for name in expected_columns if name not in table.column_names]
    if missing:
        raise UserError(f"{path}: not a logprobs file; missing columns {', '.join(missing)}")
    stored = [n for n in expected_columns if n not in ("problem_id", "sample_idx", "k")]
    columns = {name: table.column(name).combine_chunks() for name in stored}
    rows = []
    for i, (problem_id, sample_idx, k) in enumerate(
        zip(*(table.column(c).to_pylist() for c in ("problem_id", "sample_idx", "k")), strict=True)
    ):
        arrays = {name: columns[name][i].values.to_numpy(zero_copy_only=False) for name in stored}
        length = len(arrays["token_ids"])
        sizes = {"logprobs": length, "topk_ids": length * k, "tail_logprob": length}
        if first_format:
            sizes["topk_logprobs"] = length * k
        else:
            sizes |= {"top_logprob": length if k else 0, "topk_steps": length * max(k - 1, 0)}
        for name, size in sizes.items():
            if len(arrays[name]) != size:
                raise UserError(
                    f"{path} row {i}: {name}: expected {size} values ({length} tokens, k={k}), got {len(arrays[name])}"
                )
        arrays["topk_ids"] = arrays["topk_ids"].reshape(length, k)
        if first_format:
            arrays["topk_logprobs"] = arrays["topk_logprobs"].reshape(length, k)
        else:
            steps = arrays.pop("topk_steps").reshape(length, max(k - 1, 0))
            arrays["topk_logprobs"] = decode_topk(arrays.pop("top_logprob"), steps)
        rows.append((problem_id, sample_idx, TokenLogprobs(**arrays)))
    return rows
