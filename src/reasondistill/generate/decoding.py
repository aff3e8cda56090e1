"""Batched decoding for the local backends (hf, rsd): a KV cache written in place, finished rows
leaving the batch, and exact sampling seeded row by row.

Why not `model.generate`:
- its `DynamicCache` concatenates every layer's keys and values at every step, copying the whole
  cache each time (O(T²) bytes over a completion); `KVBuffer` writes into a buffer that doubles
  when full, so a step copies one token's keys and values;
- it decodes every row of a batch until the last one ends; here a row that ends (end of turn, a
  stop string) leaves the batch and the cache, so the rest decode at the batch size still alive,
  which is most of the saving on reasoning traces, whose lengths vary several-fold;
- its sampler draws the whole batch from one random stream (`torch.multinomial`), so a row's sample
  depends on the rows decoded with it. Here each row draws from its own stream (`row_uniforms`), by
  inverting the CDF of its warped softmax at one uniform per token (`TokenPicker`): a completion
  depends on its seed, prompt and the model alone — not on the batch, its size or the process that
  decodes it — and seeds mean what they mean on the openai and vllm backends (`prompt_seeds`).

The warpers (temperature, top-k, top-p) are transformers' own, in `model.generate`'s order, and a
model's generation_config.json is not applied: the step's sampling options are all that is used.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import numpy as np
import torch
from transformers import (
    DynamicCache,
    LogitsProcessorList,
    PreTrainedModel,
    StopStringCriteria,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.cache_utils import Cache, DynamicLayer

from .base import SamplingParams

# ---- seeded uniforms ----------------------------------------------------------------------------

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's output function (Steele, Lea & Flood 2014): a bijection of uint64 that mixes every bit."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def row_uniforms(seeds: Sequence[int], steps: int, stream: int = 0) -> np.ndarray:
    """[rows, steps] float64 uniforms in [0, 1): row r's t-th is the t-th output of a SplitMix64
    generator whose state starts at mix(seed_r + stream·φ), φ = 2⁶⁴/golden ratio.

    Counter-based, so any row's draws at any step are computed directly, on any machine, whatever
    other rows are decoded with it; `stream` gives a row further independent streams (the rsd
    backend draws the student's tokens from stream 1)."""
    with np.errstate(over="ignore"):
        start = _mix64(np.asarray(seeds, dtype=np.uint64) + np.uint64(stream) * _GOLDEN)
        states = start[:, None] + _GOLDEN * np.arange(1, steps + 1, dtype=np.uint64)
        return (_mix64(states) >> np.uint64(11)).astype(np.float64) * 2.0**-53


# ---- picking tokens ----------------------------------------------------------------------------


def warpers(sampling: SamplingParams) -> LogitsProcessorList:
    """The warpers `model.generate` builds for these settings, in its order."""
    chain = LogitsProcessorList()
    if sampling.temperature not in (0, 1):
        chain.append(TemperatureLogitsWarper(sampling.temperature))
    if sampling.top_k:
        chain.append(TopKLogitsWarper(sampling.top_k))
    if sampling.top_p < 1:
        chain.append(TopPLogitsWarper(sampling.top_p))
    return chain


class TokenPicker:
    """Next tokens from logits [rows, V]: the argmax when greedy, else a draw from the softmax of the
    warped logits by inverse CDF at each row's uniform u: the first token whose cumulative
    probability exceeds u · total. The CDF is summed in float64, so the sum adds no error to the float32
    probabilities however large the vocabulary, and a token of probability 0 is never drawn."""

    def __init__(self, sampling: SamplingParams):
        self.greedy = sampling.greedy
        self.warp = warpers(sampling)

    def at(
        self, logits: torch.Tensor, uniforms: torch.Tensor | None, rows: torch.Tensor, step: int
    ) -> torch.Tensor:
        """Tokens of `rows` at `step`, their uniforms taken from a [rows, steps] table (None: greedy)."""
        return self(logits, None if uniforms is None else uniforms[rows, step])

    def __call__(self, logits: torch.Tensor, uniforms: torch.Tensor | None) -> torch.Tensor:
        if self.greedy:
            return logits.argmax(-1)
        probabilities = torch.softmax(self.warp(None, logits.float()), -1)
        cdf = probabilities.double().cumsum(-1)
        targets = (uniforms.to(cdf) * cdf[:, -1])[:, None]
        return torch.searchsorted(cdf, targets, right=True)[:, 0].clamp_(max=cdf.shape[1] - 1)


# ---- the KV cache --------------------------------------------------------------------------------


class KVBuffer(DynamicLayer):
    """A full-attention layer's keys and values in a buffer written in place: `update` copies the new
    tokens only and returns views of the filled part; the buffer starts at the prompt plus `reserve`
    tokens and doubles when full (amortised O(1) per token), so memory follows the length decoded so
    far (at most twice it), as a `DynamicLayer`'s does, not `max_new_tokens`."""

    def __init__(self, reserve: int = 256):
        super().__init__()
        self.reserve, self.length = reserve, 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.key_buffer = self.value_buffer = None
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if self.key_buffer is None or end > self.key_buffer.shape[-2]:
            self._grow(key_states, value_states, end)
        self.key_buffer[:, :, self.length : end] = key_states
        self.value_buffer[:, :, self.length : end] = value_states
        self.length = end
        self._view()
        return self.keys, self.values

    def _grow(self, key_states: torch.Tensor, value_states: torch.Tensor, needed: int) -> None:
        size = max(needed + self.reserve, 2 * (0 if self.key_buffer is None else self.key_buffer.shape[-2]))
        old = (self.key_buffer, self.value_buffer)
        self.key_buffer, self.value_buffer = (
            states.new_empty(*states.shape[:2], size, states.shape[-1])
            for states in (key_states, value_states)
        )
        if old[0] is not None:
            self.key_buffer[:, :, : self.length] = old[0][:, :, : self.length]
            self.value_buffer[:, :, : self.length] = old[1][:, :, : self.length]

    def _view(self) -> None:
        self.keys = self.key_buffer[:, :, : self.length]
        self.values = self.value_buffer[:, :, : self.length]

    def get_seq_length(self) -> int:
        return self.length

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep the rows `indices`. Rows leaving a decoding batch (increasing indices) are compacted
        in place: each kept row moves down to its new place, so only the rows after the first one to
        leave are copied, and only their filled part; any other selection is gathered anew."""
        if self.key_buffer is None:
            return
        kept = len(indices)
        if kept and bool((indices[1:] > indices[:-1]).all()):
            moves = indices != torch.arange(kept, device=indices.device)
            if moves.any():
                source, target = indices[moves], moves.nonzero()[:, 0]
                for buffer in (self.key_buffer, self.value_buffer):  # the sources are gathered first
                    buffer[target, :, : self.length] = buffer[source, :, : self.length]
            self.key_buffer, self.value_buffer = self.key_buffer[:kept], self.value_buffer[:kept]
        else:
            self.key_buffer = self.key_buffer[indices, :, : self.length + self.reserve]
            self.value_buffer = self.value_buffer[indices, :, : self.length + self.reserve]
        self._view()

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last |tokens_to_remove| tokens (a negative count, as `DynamicLayer.crop` takes)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative count of tokens to remove, got {tokens_to_remove}")
        self.length = max(0, self.length + tokens_to_remove)
        if self.key_buffer is not None:
            self._view()

    def reset(self) -> None:
        self.key_buffer = self.value_buffer = self.keys = self.values = None
        self.length, self.is_initialized = 0, False


def new_cache(model: PreTrainedModel) -> Cache:
    """`KVBuffer`s when every layer is plain full attention (the usual decoder), else the model's own
    `DynamicCache` (sliding windows, linear attention …), from which `Decoder` drops rows where its
    layers allow."""
    cache = DynamicCache(config=model.config)
    if cache.layers and all(type(layer) is DynamicLayer for layer in cache.layers):
        return Cache(layers=[KVBuffer() for _ in cache.layers])
    return cache


class Decoder:
    """One model's side of a batched decoding: its KV cache, fed one token per live row per step;
    `step_forward` (default: the model) runs the one-token steps after the prefill, e.g. the model's
    forward compiled (`compiled_steps`)."""

    def __init__(self, model: PreTrainedModel, step_forward: Callable | None = None):
        self.model, self.step_forward = model, step_forward or model
        self.cache = new_cache(model)
        # transformers 5.x renamed the forward's `past_key_values` argument to `cache`
        parameters = inspect.signature(model.forward).parameters
        self.cache_argument = "cache" if "cache" in parameters else "past_key_values"
        self.droppable = all(hasattr(layer, "batch_select_indices") for layer in self.cache.layers)

    def step(self, input_ids: torch.Tensor, attention: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Float32 logits [rows, V] of the next token; `attention` covers the cache and `input_ids`."""
        forward = self.model if self.cache.get_seq_length() == 0 else self.step_forward
        output = forward(
            input_ids=input_ids,
            attention_mask=attention,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **{self.cache_argument: self.cache},
        )
        return output.logits[:, -1].float()

    def keep(self, rows: torch.Tensor) -> None:
        self.cache.batch_select_indices(rows)


COMPILE_BACKEND = "inductor"  # torch.compile's default; the tests use "eager" (capture and guards only)


def compiled_steps(model: PreTrainedModel) -> Callable:
    """The model's forward under `torch.compile` with dynamic shapes, for the one-token steps: one
    graph serves every batch size and cache length (the prefill, whose shapes vary most, stays eager).

    The first call compiles (about 10 s for the testbed's models on 2 CPU cores, longer for larger
    ones), later calls, new weights included, reuse it; the fused kernels give logits equal to eager
    ones up to their last bits, so a sample can, rarely, differ."""
    return torch.compile(model.forward, dynamic=True, backend=COMPILE_BACKEND)


# ---- the loop ----------------------------------------------------------------------------------

# (logits of each model [live, V], the live rows' indices in the batch, step) -> their next tokens
Chooser = Callable[[list[torch.Tensor], torch.Tensor, int], torch.Tensor]


def decode(
    models: Sequence[PreTrainedModel],
    input_ids: torch.Tensor,
    attention: torch.Tensor,
    choose: Chooser,
    *,
    max_new_tokens: int,
    eos_token_id: int | None,
    pad_token_id: int,
    stop: StopStringCriteria | None = None,
    step_forwards: Sequence[Callable | None] | None = None,
) -> list[list[int]]:
    """New tokens of each left-padded row of `input_ids` [B, P], up to and including its end token,
    the token that completes a stop string (checked over prompt and completion, as `model.generate`
    does), or `max_new_tokens`.

    Every model reads the same tokens (the rsd backend decodes a teacher and a student together);
    `choose` picks each step's tokens from their logits; `step_forwards` (one per model, None: the
    model) run the steps after the prefill (`Decoder`). A row leaves the batch, and every model's
    cache, at the step it ends."""
    rows, prompt_length = input_ids.shape
    device = input_ids.device
    forwards = step_forwards or [None] * len(models)
    decoders = [Decoder(model, forward) for model, forward in zip(models, forwards, strict=True)]
    droppable = all(d.droppable for d in decoders)
    # the attention mask and the sequences (for stop strings) of the batch's rows, at full length
    mask = torch.zeros(rows, prompt_length + max_new_tokens, dtype=attention.dtype, device=device)
    mask[:, :prompt_length] = attention
    sequences = torch.cat([input_ids, input_ids.new_full((rows, max_new_tokens), pad_token_id)], 1)
    new = input_ids.new_full((rows, max_new_tokens), pad_token_id)
    lengths = [max_new_tokens] * rows
    live = torch.arange(rows, device=device)
    # the batch's rows that have not ended (an ended row stays in it only if a cache cannot drop rows)
    open_rows = torch.ones(rows, dtype=torch.bool, device=device)
    # left padding: real tokens at positions 0, 1, …; pads get 0 and are masked out anyway
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    step_ids = input_ids
    for t in range(max_new_tokens):
        end = prompt_length + t
        logits = [d.step(step_ids, mask[:, :end], positions) for d in decoders]
        token = torch.where(open_rows, choose(logits, live, t), pad_token_id)
        new[live, t] = token
        sequences[:, end] = token
        mask[:, end] = 1
        ended = (
            open_rows & (token == eos_token_id) if eos_token_id is not None else torch.zeros_like(open_rows)
        )
        if stop is not None:
            ended |= open_rows & stop(sequences[:, max(0, end + 1 - stop.maximum_token_len) : end + 1], None)
        if ended.any():
            for row in live[ended].tolist():
                lengths[row] = t + 1
            open_rows &= ~ended
            if not open_rows.any():
                break
            if droppable:
                kept = open_rows.nonzero()[:, 0]
                for d in decoders:
                    d.keep(kept)
                live, open_rows, token = live[kept], open_rows[kept], token[kept]
                mask, sequences, positions = mask[kept], sequences[kept], positions[kept]
        step_ids = token[:, None]
        positions = positions[:, -1:] + 1
    return [ids[:length] for ids, length in zip(new.tolist(), lengths, strict=True)]
