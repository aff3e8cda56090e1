"""Turn (chat prompt, completion) examples into token ids with the loss on completion tokens only."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import Sampler
from transformers import PreTrainedTokenizerBase

from ..chat import completion_ids, prompt_ids
from ..errors import UserError
from ..generate.logprobs import TokenLogprobs
from ..objectives import Objective
from ..objectives.base import IGNORE_INDEX
from ..processes import barrier, on_main, world_size
from ..records import PairExample, TrainingExample


@dataclass(frozen=True)
class SharedTokenIds:
    """Token ids computed once for every process of a job: process 0 tokenizes and writes them to
    `folder/<name>.arrow`, the others read them (memory-mapped Arrow) instead of tokenizing again.
    With no folder, or in a job of one process, every call simply computes."""

    folder: Path | None = None

    def __call__(self, name: str, compute: Callable[[], list[list[int]]]) -> list[list[int]]:
        if self.folder is None or world_size() == 1:
            return compute()
        path = self.folder / f"{name}.arrow"

        def write() -> list[list[int]]:
            ids = compute()
            self.folder.mkdir(parents=True, exist_ok=True)
            with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, _IDS_SCHEMA) as writer:
                writer.write_table(pa.table({"ids": pa.array(ids, type=_IDS_SCHEMA.field("ids").type)}))
            return ids

        ids = on_main(write, f"tokenizing ({name})")
        if ids is None:
            with pa.memory_map(str(path)) as source:
                ids = pa.ipc.open_file(source).read_all().column("ids").to_pylist()
        barrier()  # every process has read the file before process 0 may remove it
        return ids


_IDS_SCHEMA = pa.schema([("ids", pa.list_(pa.int32()))])
TOKENIZE_HERE = SharedTokenIds()  # every process tokenizes for itself


@dataclass
class TokenizedExample:
    """An example's token ids and labels, int32 arrays (4 bytes a token, where Python lists of ints
    took over 100 at 10^7 tokens)."""

    input_ids: np.ndarray  # int32
    labels: np.ndarray  # int32: IGNORE_INDEX on the prompt, then the completion's ids
    full_length: int  # prompt + completion + end of turn, before the cut at max_length

    def __post_init__(self):
        self.input_ids = np.asarray(self.input_ids, dtype=np.int32)
        self.labels = np.asarray(self.labels, dtype=np.int32)

    @property
    def prompt_length(self) -> int:
        """Where the completion starts: the first position whose label counts."""
        counted = np.flatnonzero(self.labels != IGNORE_INDEX)
        return int(counted[0]) if len(counted) else len(self.labels)

    @property
    def truncated(self) -> bool:
        """Cut at max_length: the completion lost its end (its final answer and end-of-turn token)."""
        return self.full_length > len(self.input_ids)


def tokenize_examples(
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[TrainingExample],
    max_length: int,
    shared: SharedTokenIds = TOKENIZE_HERE,
    name: str = "examples",
) -> list[TokenizedExample]:
    """Prompt ids (labels ignored) followed by completion ids and EOS (labels = ids), per example.

    Prompt and completion are tokenized separately, so the boundary is exact: this is also how the
    completion's tokens follow the prompt at generation time. `shared` tokenizes once per job.
    `TOKENIZE_CHUNK` examples at a time: the tokenizer's Python lists of a chunk become arrays before
    the next chunk is tokenized.
    """
    tokenized = []
    for first in range(0, len(examples), TOKENIZE_CHUNK):
        chunk = examples[first : first + TOKENIZE_CHUNK]
        part = f"{first // TOKENIZE_CHUNK}"
        prompts = shared(
            f"{name}-prompts-{part}", partial(prompt_ids, tokenizer, [e.messages for e in chunk])
        )
        completions = shared(
            f"{name}-completions-{part}", partial(completion_ids, tokenizer, [e.completion for e in chunk])
        )
        for example, prompt, completion in zip(chunk, prompts, completions, strict=True):
            if len(prompt) >= max_length:
                # no completion token would be left to train on (and a pair loss would compare nothing)
                raise UserError(
                    f"problem {example.problem_id!r}: the prompt alone has {len(prompt)} tokens, "
                    f"max_length is {max_length}; raise max_length or leave the problem out"
                )
            input_ids = np.asarray((prompt + completion)[:max_length], dtype=np.int32)
            labels = input_ids.copy()
            labels[: len(prompt)] = IGNORE_INDEX
            tokenized.append(TokenizedExample(input_ids, labels, full_length=len(prompt) + len(completion)))
    return tokenized


TOKENIZE_CHUNK = 4096  # examples tokenized at a time (and shared between processes as one file)


def tokenize_pairs(
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[PairExample],
    max_length: int,
    shared: SharedTokenIds = TOKENIZE_HERE,
) -> list[tuple[TokenizedExample, TokenizedExample]]:
    """(chosen, rejected) tokenized like `tokenize_examples`, sharing the prompt."""
    messages = [p.messages for p in pairs]
    chosen = tokenize_examples(
        tokenizer, _as_examples(pairs, messages, "chosen"), max_length, shared, "chosen"
    )
    rejected = tokenize_examples(
        tokenizer, _as_examples(pairs, messages, "rejected"), max_length, shared, "rejected"
    )
    return list(zip(chosen, rejected, strict=True))


def _as_examples(pairs: Sequence[PairExample], messages, side: str) -> list[TrainingExample]:
    return [
        TrainingExample(problem_id=p.problem_id, task=p.task, messages=m, completion=getattr(p, side))
        for p, m in zip(pairs, messages, strict=True)
    ]


@dataclass
class SparseTeacherRows:
    """A teacher's top-k distributions laid out on an example's token positions.

    Row j describes the distribution of token j (predicted at position j − 1), like `labels[j]`;
    prompt rows are zero and never read (their labels are ignored).
    """

    topk_ids: np.ndarray  # [L, k] int64
    topk_logprobs: np.ndarray  # [L, k] float32
    tail_logprob: np.ndarray  # [L] float32
    token_logprob: np.ndarray  # [L] float32: log p_T of token j itself

    @staticmethod
    def placed(
        start: int,
        topk_ids: np.ndarray,
        topk_logprobs: np.ndarray,
        tail_logprob: np.ndarray,
        token_logprob: np.ndarray,
    ) -> SparseTeacherRows:
        """The rows of n completion tokens ([n, k] and [n] arrays) placed after a prompt of `start`
        tokens."""
        length, k = start + len(tail_logprob), topk_ids.shape[1]
        rows = SparseTeacherRows(
            np.zeros((length, k), dtype=np.int64),
            np.zeros((length, k), dtype=np.float32),
            np.zeros(length, dtype=np.float32),
            np.zeros(length, dtype=np.float32),
        )
        rows.topk_ids[start:] = topk_ids
        rows.topk_logprobs[start:] = topk_logprobs
        rows.tail_logprob[start:] = tail_logprob
        rows.token_logprob[start:] = token_logprob
        return rows

    @staticmethod
    def on_positions(scored: TokenLogprobs, prompt_length: int, completion_length: int) -> SparseTeacherRows:
        """The first `completion_length` scored tokens placed after a prompt of `prompt_length` tokens."""
        n = completion_length
        return SparseTeacherRows.placed(
            prompt_length,
            scored.topk_ids[:n],
            scored.topk_logprobs[:n],
            scored.tail_logprob[:n],
            scored.logprobs[:n],
        )

    @staticmethod
    def joined(rows: Sequence[SparseTeacherRows]) -> SparseTeacherRows:
        """The rows of examples packed one after another."""
        fields = ("topk_ids", "topk_logprobs", "tail_logprob", "token_logprob")
        return SparseTeacherRows(*(np.concatenate([getattr(row, name) for row in rows]) for name in fields))


def sparse_teacher_batch(rows: Sequence[SparseTeacherRows], width: int) -> dict[str, torch.Tensor]:
    """The rows of a batch as right-padded `teacher_*` tensors of `width` positions."""
    k = rows[0].topk_ids.shape[1]
    batch = {
        "teacher_topk_ids": torch.zeros((len(rows), width, k), dtype=torch.long),
        "teacher_topk_logprobs": torch.zeros((len(rows), width, k)),
        "teacher_tail_logprob": torch.zeros((len(rows), width)),
        "teacher_token_logprob": torch.zeros((len(rows), width)),
    }
    for i, row in enumerate(rows):
        length = len(row.tail_logprob)
        batch["teacher_topk_ids"][i, :length] = torch.from_numpy(row.topk_ids)
        batch["teacher_topk_logprobs"][i, :length] = torch.from_numpy(row.topk_logprobs)
        batch["teacher_tail_logprob"][i, :length] = torch.from_numpy(row.tail_logprob)
        batch["teacher_token_logprob"][i, :length] = torch.from_numpy(row.token_logprob)
    return batch


@dataclass
class CompletionCollator:
    """Right-pads a batch; padded positions get attention 0 and label IGNORE_INDEX.

    Features hold `input_ids` and `labels`, or `chosen_*` and `rejected_*` for pair objectives (chosen
    rows first, then rejected rows in the same order), and an `index` into `sparse_teacher` when a
    stored teacher distribution comes with the examples. The objective may then select the labels
    it trains on (chunk-wise training), before the Trainer counts tokens for the normaliser.
    """

    pad_token_id: int
    objective: Objective | None = None
    sparse_teacher: Sequence[SparseTeacherRows] | None = None
    packed: bool = False  # one row per batch, examples one after another (see `packed_batch`)

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        if self.packed:
            return self.packed_batch(features)
        if "chosen_input_ids" in features[0]:
            features = [
                {"input_ids": f[f"{side}_input_ids"], "labels": f[f"{side}_labels"]}
                for side in ("chosen", "rejected")
                for f in features
            ]
        width = max(len(f["input_ids"]) for f in features)

        def pad(values: list[int], fill: int) -> list[int]:
            return values + [fill] * (width - len(values))

        batch = {
            "input_ids": torch.tensor([pad(f["input_ids"], self.pad_token_id) for f in features]),
            "attention_mask": torch.tensor([pad([1] * len(f["input_ids"]), 0) for f in features]),
            "labels": torch.tensor([pad(f["labels"], IGNORE_INDEX) for f in features]),
        }
        if self.sparse_teacher is not None:
            rows = [self.sparse_teacher[f["index"]] for f in features]
            batch.update(sparse_teacher_batch(rows, width))
        if self.objective is not None:
            batch["labels"] = self.objective.select_labels(batch["input_ids"], batch["labels"])
        return batch

    def packed_batch(self, features: list[dict]) -> dict[str, torch.Tensor]:
        """The examples side by side in one row [1, Σ lengths], without padding.

        `position_ids` restart at 0 with each example: transformers then confines attention to each
        example (a block-diagonal causal mask with sdpa and eager; varlen kernels with
        flash-attention), so an example's hidden states are those it has alone. `example_ids` says
        which example each token belongs to, for objectives that work per sequence. A boundary
        never mixes examples in the loss: each example starts with its prompt, whose labels are
        ignored, so no position predicts the next example's first token.
        """
        lengths = [len(f["input_ids"]) for f in features]
        batch = {
            "input_ids": torch.tensor([[t for f in features for t in f["input_ids"]]]),
            "labels": torch.tensor([[t for f in features for t in f["labels"]]]),
            "position_ids": torch.cat([torch.arange(n) for n in lengths])[None],
            "example_ids": torch.repeat_interleave(torch.arange(len(features)), torch.tensor(lengths))[None],
            "num_examples": torch.tensor(len(features)),
        }
        if self.sparse_teacher is not None:
            row = SparseTeacherRows.joined([self.sparse_teacher[f["index"]] for f in features])
            batch.update(sparse_teacher_batch([row], sum(lengths)))
        return batch


class SortedStepSampler(Sampler[int]):
    """Random order, except that the examples of each optimizer step are sorted by length.

    A step's examples (micro-batch size × accumulation steps × processes) are drawn at random as
    usual, then sorted so each micro-batch holds similar lengths. The loss is normalised over the whole
    step, so the update is the one an unsorted random batch would give, with far less padding when
    short and long examples are mixed. (Grouping whole batches by length instead, as transformers'
    `group_by_length` does, makes each update single-task on the testbed and stalled learning.)
    """

    def __init__(self, lengths: Sequence[int], examples_per_step: int, seed: int):
        self.lengths, self.examples_per_step, self.seed = list(lengths), examples_per_step, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by the Trainer / accelerate at each epoch, so a resumed run replays the same order."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        for start in range(0, len(order), self.examples_per_step):
            yield from sorted(order[start : start + self.examples_per_step], key=self.lengths.__getitem__)
