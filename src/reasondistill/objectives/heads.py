"""Logits of completion positions, projected chunk by chunk so [tokens, vocab] never exists whole.

A language-model head turns hidden states [N, H] into logits [N, V]. At V = 151,936 and a few
thousand completion tokens, the float32 logits and log-probabilities of student and teacher are
the largest tensors of a distillation step. Here the trainer keeps only the final hidden states of
the completion positions, and objectives work on chunks of positions, so the peak is one chunk's
[chunk, V] tensors:
- `sum_token_chunks` (a loss that is a sum of per-token terms: the divergences, the policy
  gradients): each chunk's gradient with respect to the hidden states and the head is computed as
  the chunk is projected, in the forward pass, and handed to autograd for the backward pass, so no
  logits are projected twice (the fused-linear approach of Liger-Kernel's FusedLinearJSD);
- `map_token_chunks` (objectives that need every token's value before they can combine them: TSD-KD's
  ranking, AdaSPEC's selection): each chunk's logits are recomputed in the backward pass instead of
  being stored (activation checkpointing per chunk).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint


@dataclass
class Head:
    """Hidden states of N positions and the output projection that turns them into logits.

    With `weight` None, `hidden` already holds logits (models whose head cannot be called apart).
    `vocab_size` keeps the first rows of the projection only: padded vocabulary rows (Qwen2.5 pads
    151,665 tokens to 151,936 or 152,064 rows) are never a real token and are cut so that teacher
    and student distributions live on the same support.
    """

    hidden: torch.Tensor  # [N, H], or [N, V] logits when weight is None
    weight: torch.Tensor | None = None  # [V', H]
    bias: torch.Tensor | None = None  # [V']
    vocab_size: int | None = None

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits [n, V] of a chunk of `hidden`."""
        if self.weight is None:
            return hidden[:, : self.vocab_size].float()
        weight = self.weight[: self.vocab_size]
        bias = None if self.bias is None else self.bias[: self.vocab_size]
        return torch.nn.functional.linear(hidden, weight, bias).float()

    def __len__(self) -> int:
        return self.hidden.shape[0]


@dataclass
class SparseTargets:
    """A teacher's top-k log-probabilities per position, as stored by `generate --logprobs` / `score`.

    `tail_logprob` = log(1 − Σ top-k p), the mass the store does not itemise; `token_logprob` is the
    teacher's log-probability of the token the position predicts, which may lie outside the top-k
    (policy-gradient objectives need it for sampled tokens).
    """

    ids: torch.Tensor  # [N, k] int64
    logprobs: torch.Tensor  # [N, k] float32
    tail_logprob: torch.Tensor  # [N] float32
    token_logprob: torch.Tensor | None = None  # [N] float32

    def __len__(self) -> int:
        return self.ids.shape[0]


Rows = torch.Tensor | Head | SparseTargets | None


def chunk_of(value: Rows, start: int, stop: int) -> Rows:
    """Positions start:stop of a per-position value (tensor, Head or SparseTargets)."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return value[start:stop]
    if isinstance(value, Head):
        return Head(value.hidden[start:stop], value.weight, value.bias, value.vocab_size)
    return SparseTargets(
        value.ids[start:stop],
        value.logprobs[start:stop],
        value.tail_logprob[start:stop],
        None if value.token_logprob is None else value.token_logprob[start:stop],
    )


TokenFunction = Callable[..., torch.Tensor | tuple[torch.Tensor, ...]]


def map_token_chunks(
    fn: TokenFunction, student: Head, rows: dict[str, Rows], chunk_size: int
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Apply `fn(student_logits [n, V], **rows_chunk)` to chunks of positions; concatenate its [n] outputs.

    `rows` holds per-position values (tensors, teacher `Head`s, `SparseTargets`); a Head in `rows`
    is projected to logits under no_grad before `fn` sees it. When the student needs gradients every
    chunk but the last runs under activation checkpointing: its [n, V] tensors are freed after the
    forward pass and recomputed during backward, so memory holds one chunk's logits at a time. The
    last chunk keeps its tensors: its backward runs first, so recomputing it would save no memory
    and cost a second projection (a third of the loss's time when everything fits in one chunk).
    """
    outputs = []
    for start in range(0, max(len(student), 1), chunk_size):  # one (empty) chunk when N = 0
        stop = min(start + chunk_size, len(student))
        chunk_rows = {name: chunk_of(value, start, stop) for name, value in rows.items()}
        hidden = student.hidden[start:stop]

        def run(hidden: torch.Tensor, chunk_rows=chunk_rows) -> torch.Tensor | tuple[torch.Tensor, ...]:
            resolved = {}
            for name, value in chunk_rows.items():
                if isinstance(value, Head):
                    with torch.no_grad():
                        value = value.logits(value.hidden)
                resolved[name] = value
            return fn(student.logits(hidden), **resolved)

        last = stop >= len(student)
        if not last and torch.is_grad_enabled() and (hidden.requires_grad or _requires_grad(student)):
            outputs.append(checkpoint(run, hidden, use_reentrant=False))
        else:
            outputs.append(run(hidden))
    if isinstance(outputs[0], tuple):
        return tuple(torch.cat(parts) for parts in zip(*outputs, strict=True))
    return torch.cat(outputs)


def sum_token_chunks(
    fn: TokenFunction, student: Head, rows: dict[str, Rows], chunk_size: int, normaliser
) -> torch.Tensor:
    """Σ over positions of `fn(student_logits [n, V], **rows_chunk)` (a [n] tensor) / `normaliser`:
    the value `sum_over_tokens(map_token_chunks(fn, …))` gives, with its gradient computed chunk by
    chunk during this forward pass.

    For each chunk, d loss / d logits [n, V] comes from autograd on `fn` alone; the gradients of the
    hidden states (dlogits · W) and of the head (dlogitsᵀ · h, accumulated in place into one [V, H]
    buffer) follow as two matrix products, and the chunk's logits are freed. The backward pass then
    only scales the stored gradients by the incoming one: three projections' worth of work for the
    loss in all, as an unchunked loss does, where checkpointed chunks take four. Memory holds one
    chunk's [n, V] tensors and their gradients, plus the head's gradient from the forward pass on
    (the backward pass of an unchunked loss makes it too, later).
    """
    needs_grad = torch.is_grad_enabled() and (student.hidden.requires_grad or _requires_grad(student))
    if student.weight is None or not needs_grad:
        return map_token_chunks(fn, student, rows, chunk_size).sum() / normaliser
    # A chunk here holds its logits' temporaries and their gradients at once, as a checkpointed chunk
    # does only in its backward pass: half as many positions keep the peak of `chunk_size` (at
    # 151,936 tokens, 0.11× a naive forward KL's memory where whole chunks took 0.19×, and no slower).
    half = max(1, chunk_size // 2)
    return _ChunkedSum.apply(
        student.hidden, student.weight, student.bias, (fn, student, rows, half, normaliser)
    )


class _ChunkedSum(torch.autograd.Function):
    """The scalar loss of `sum_token_chunks`, whose gradients the forward pass has already computed."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, task):
        fn, student, rows, chunk_size, normaliser = task
        vocab = weight.shape[0] if student.vocab_size is None else min(student.vocab_size, weight.shape[0])
        grad_hidden = torch.zeros_like(hidden)
        grad_weight = torch.zeros_like(weight) if weight.requires_grad else None
        grad_bias = torch.zeros_like(bias) if bias is not None and bias.requires_grad else None
        total = torch.zeros((), device=hidden.device)
        for start in range(0, len(student), chunk_size):
            stop = min(start + chunk_size, len(student))
            chunk_rows = {name: chunk_of(value, start, stop) for name, value in rows.items()}
            resolved = {
                name: value.logits(value.hidden) if isinstance(value, Head) else value
                for name, value in chunk_rows.items()
            }
            h = hidden[start:stop]
            projected = torch.nn.functional.linear(h, weight[:vocab], None if bias is None else bias[:vocab])
            with torch.enable_grad():
                logits = projected.float().requires_grad_()
                loss = fn(logits, **resolved).sum() / normaliser
                (dlogits,) = torch.autograd.grad(loss, logits)
            total += loss.detach()
            dlogits = dlogits.to(projected.dtype)  # the projection's own precision, as autograd would
            grad_hidden[start:stop] = (dlogits @ weight[:vocab].to(projected.dtype)).to(hidden.dtype)
            if grad_weight is not None:
                if projected.dtype == weight.dtype:  # in place: no [V, H] temporary
                    grad_weight[:vocab].addmm_(dlogits.T, h.to(weight.dtype))
                else:  # mixed precision: the product in the projection's precision, as autograd would
                    grad_weight[:vocab] += (dlogits.T @ h.to(projected.dtype)).to(weight.dtype)
            if grad_bias is not None:
                grad_bias[:vocab] += dlogits.sum(0).to(bias.dtype)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors

        def scaled(grad):  # in place: a second [V, H] tensor would double the head's gradient memory
            return None if grad is None else grad.mul_(grad_output)

        return scaled(grad_hidden), scaled(grad_weight), scaled(grad_bias), None


def _requires_grad(head: Head) -> bool:
    return any(t is not None and t.requires_grad for t in (head.weight, head.bias))
