"""Sequence-level objectives: the student learns from the teacher's text alone (no teacher logits).

`sft` trains on every completion token; `masked_thought` reads a corrupted completion and predicts
the original tokens; `cwt` trains on one chunk of each completion per step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import PrivateAttr
from transformers import PreTrainedTokenizerBase

from ..errors import UserError
from .base import IGNORE_INDEX, Objective, ObjectiveInputs, register
from .heads import sum_token_chunks
from .options import ChunkWiseTrainingOptions, MaskedThoughtOptions, SFTOptions


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """−log p_S(y_t | x, y_<t) per position: [n, V] logits, [n] labels → [n]."""
    return F.cross_entropy(logits, labels, reduction="none")


def completion_nll(inputs: ObjectiveInputs) -> torch.Tensor:
    """Σ_t −log p_S(y_t | x, y_<t) over completion tokens / completion tokens in the global batch."""
    rows = {"labels": inputs.labels}
    return sum_token_chunks(token_nll, inputs.student, rows, inputs.chunk_size, inputs.normaliser)


@register
class SFT(SFTOptions, Objective):
    """loss = −Σ_t m_t · log p_S(y_t | x, y_<t) / N, with m_t = 1 on completion tokens and N the number
    of completion tokens in the global batch.
    """

    def __call__(self, inputs: ObjectiveInputs) -> torch.Tensor:
        return completion_nll(inputs)


# --- Masked Thought (MFT): SFT on a corrupted reading of the completion ---------------------------


def mask_rate(progress: float, max_rate: float, warmup_fraction: float) -> float:
    """Masked Thought's schedule p(progress) = min(p_max, p_max · progress / warmup_fraction).

    A linear warm-up from 0 over the first `warmup_fraction` of training, then constant p_max
    (p_max from the start when warmup_fraction = 0).
    """
    if warmup_fraction <= 0:
        return max_rate
    return min(max_rate, max_rate * max(progress, 0.0) / warmup_fraction)


def corruptible_positions(labels: torch.Tensor) -> torch.Tensor:
    """[B, S] bool: completion tokens (label ≠ IGNORE) that some later completion label of the row reads.

    That is every completion token but the last one of each row (the EOS, or the last kept token of a
    truncated completion): under causal attention the last one conditions no labelled position, so
    corrupting it changes nothing. Prompt tokens are never corruptible.
    """
    completion = labels != IGNORE_INDEX
    count = completion.int()
    later = count.flip(-1).cumsum(-1).flip(-1) - count  # completion labels strictly after each index
    return completion & (later > 0)


@register
class MaskedThought(MaskedThoughtOptions, Objective):
    """The student reads ỹ, the completion with each token independently replaced (probability p) by
    the mask token, and predicts the original tokens: loss = −Σ_t log p_S(y_t | x, ỹ_<t) / N, N the
    completion tokens of the global batch; labels are never changed, prompt tokens never corrupted.
    p(progress) = min(p_max, p_max · progress / warmup_fraction) (progress = fraction of training done).

    Defaults are the paper's MATH / MAmmoTH setting: p_max 0.2, warm-up over the first 2/3 of
    training (`mask_rate_warmup 0.66` in the official script), mask token = the pad token (the
    README's suggestion; MFT's GSM8K script uses p_max 0.4 with `replacement: random`). The last
    completion token of each row (the EOS) is left alone: it conditions no labelled position, so
    the rate p applies to the tokens whose corruption matters (the official code masks it too, to no
    effect). Random replacement draws uniformly from all tokenizer ids, special tokens included. The
    draws use torch's global RNG (seeded by the trainer).
    """

    _pad_id: int | None = PrivateAttr(None)
    _vocab_size: int | None = PrivateAttr(None)

    def setup(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self._vocab_size = len(tokenizer)
        self._pad_id = tokenizer.pad_token_id
        if self.replacement == "pad" and self._pad_id is None:
            raise UserError(
                "objective masked_thought: the tokenizer has no pad token; set objective_args.replacement: random"
            )

    def corrupt_inputs(self, input_ids: torch.Tensor, labels: torch.Tensor, progress: float) -> torch.Tensor:
        rate = mask_rate(progress, self.max_rate, self.warmup_fraction)
        if rate == 0:
            return input_ids
        if self._vocab_size is None:
            raise RuntimeError("masked_thought: setup(tokenizer) must be called before training")
        hit = corruptible_positions(labels) & (torch.rand(input_ids.shape, device=input_ids.device) < rate)
        if self.replacement == "pad":
            replacement = torch.full_like(input_ids, self._pad_id)
        else:
            replacement = torch.randint_like(input_ids, self._vocab_size)
        return torch.where(hit, replacement, input_ids)

    def __call__(self, inputs: ObjectiveInputs) -> torch.Tensor:
        return completion_nll(inputs)


# --- Skip-Thinking chunk-wise training (CWT): one chunk of each completion per step ---------------


def line_chunks(is_newline: list[bool], min_tokens: int) -> list[tuple[int, int]]:
    """[start, stop) spans of consecutive whole lines, each of ≥ `min_tokens` tokens, covering the sequence.

    A line ends with (and includes) a newline token, so every chunk but the first starts right after
    one. Lines are added to a chunk until it holds ≥ `min_tokens` tokens; the text after the last
    chunk is a chunk of its own if it has ≥ `min_tokens` tokens, else it joins the last chunk (one
    chunk only when the whole sequence is shorter).
    """
    spans: list[tuple[int, int]] = []
    start = 0
    for index, newline in enumerate(is_newline):
        if newline and index + 1 - start >= min_tokens:
            spans.append((start, index + 1))
            start = index + 1
    if start < len(is_newline):
        if spans and len(is_newline) - start < min_tokens:
            spans[-1] = (spans[-1][0], len(is_newline))
        else:
            spans.append((start, len(is_newline)))
    return spans


def average_chunks(length: int, chunks: int) -> list[tuple[int, int]]:
    """[start, stop) spans of min(chunks, length) near-equal pieces (sizes differ by ≤ 1, longer first)."""
    count = min(chunks, length)
    size, extra = divmod(length, count) if count else (0, 0)
    spans, start = [], 0
    for piece in range(count):
        stop = start + size + (piece < extra)
        spans.append((start, stop))
        start = stop
    return spans


@register
class ChunkWiseTraining(ChunkWiseTrainingOptions, Objective):
    """Per example and step, the completion y is split into chunks k_1..k_n and one index j is drawn
    uniformly; labels outside k_j are ignored, so loss = −Σ_{t∈k_j} log p_S(y_t | x, k_<j, y_<t) / N,
    N = the selected tokens of the global batch (a token mean over the batch; the card writes a
    per-chunk mean /|k_j|). Earlier chunks stay in the input as context; later tokens are invisible
    under causal attention. The chunk holding the final answer and EOS is a chunk like any other.

    Chunking: `lines` groups whole lines (split after tokens whose text contains a newline) until a
    chunk has ≥ `min_chunk_tokens` tokens, a stand-in for the paper's search-based semantic chunking
    (SBC, whose coherence metric was not recovered); `average` is the paper's average chunking (AC),
    `chunks` near-equal pieces. Token budget: each step trains on ~1/n of every completion, so one
    epoch of CWT supervises ~1/n of the tokens an SFT epoch does; multiply the epochs by n (the card's
    "match the token budget to baselines") when comparing with SFT.
    """

    _newline_ids: torch.Tensor | None = PrivateAttr(None)

    def setup(self, tokenizer: PreTrainedTokenizerBase) -> None:
        texts = tokenizer.batch_decode([[token] for token in range(len(tokenizer))])
        self._newline_ids = torch.tensor([token for token, text in enumerate(texts) if "\n" in text])

    def spans(self, completion_ids: torch.Tensor) -> list[tuple[int, int]]:
        """The chunks of one completion's token ids [T], as [start, stop) spans covering 0..T."""
        if self.chunking == "average":
            return average_chunks(len(completion_ids), self.chunks)
        if self._newline_ids is None:
            raise RuntimeError("cwt: setup(tokenizer) must be called before training with chunking: lines")
        is_newline = torch.isin(completion_ids, self._newline_ids.to(completion_ids.device))
        return line_chunks(is_newline.tolist(), self.min_chunk_tokens)

    def select_labels(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        selected = torch.full_like(labels, IGNORE_INDEX)
        for row in range(labels.shape[0]):
            positions = (labels[row] != IGNORE_INDEX).nonzero().squeeze(-1)
            if len(positions) == 0:
                continue
            spans = self.spans(input_ids[row, positions])
            start, stop = spans[int(torch.randint(len(spans), ()))]
            keep = positions[start:stop]
            selected[row, keep] = labels[row, keep]
        return selected

    def __call__(self, inputs: ObjectiveInputs) -> torch.Tensor:
        return completion_nll(inputs)
