"""Teacher-forced scoring: a model's logits at every completion token of (prompt, completion) pairs.

One forward pass per batch, no gradients, right padding (positions stay 0..len-1), and the final
hidden states projected onto the vocabulary `LOGIT_CHUNK` positions at a time: a [T, V] float32
block for every sequence would not fit for a 150k-token vocabulary. What each chunk of logits
becomes is the caller's reduction: the hf backend keeps the top-k and the tail (`from_logits`), the
analyses the chosen token's log-probability, select_teacher the negative log-likelihood.

The projection multiplies the hidden states by the output embeddings itself, so a model whose
logits are rescaled after the head is refused (`check_plain_logits`): the scores would silently
miss the rescaling. The trainer refuses such models for the same reason.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import UserError

if TYPE_CHECKING:
    import torch

LOGIT_CHUNK = 256  # positions projected onto the vocabulary at once: 256 × 151,936 float32 = 156 MB

R = TypeVar("R")


def check_plain_logits(config: Any, name: str, why: str) -> None:
    """Refuse a model (by its config) whose logits are not a plain projection of its final hidden
    states; `why` says what projects them here, for the message."""
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        raise UserError(
            f"{name}: models that rescale their logits (final_logit_softcapping, logit_scale) are not "
            f"supported: {why}"
        )


def teacher_forced(
    model: Any,
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    reduce: Callable[[torch.Tensor, torch.Tensor], R],
    *,
    batch_size: int,
    vocab_size: int | None,
    chunk_size: int = LOGIT_CHUNK,
    by_length: bool = False,
    progress: Callable[[int], None] | None = None,
) -> list[list[R]]:
    """`reduce(logits, targets)` of every chunk of each completion, per pair, in the pairs' order.

    `logits` [n, V] (the model's dtype) are the next-token logits at n consecutive completion
    positions, `targets` [n] the completion tokens they predict; every completion has at least one
    chunk (an empty one when it has no tokens). `vocab_size` keeps the head's first rows only (rows
    beyond the tokenizer are padding, never a token); None keeps them all. Pairs are scored
    `batch_size` at a time in the given order, or shortest first with `by_length` (less padding);
    `progress` hears the pairs of each finished batch.
    """
    import torch

    name = str(getattr(model.config, "name_or_path", "") or type(model).__name__)
    check_plain_logits(model.config, name, "scoring projects hidden states with the output embeddings")
    order = list(range(len(prompts)))
    if by_length:
        order.sort(key=lambda i: len(prompts[i]) + len(completions[i]))
    results: list[list[R]] = [[] for _ in order]
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            hidden = _final_hidden_states(model, [list(prompts[i]) + list(completions[i]) for i in rows])
            for row, i in enumerate(rows):
                results[i] = _reduce_chunks(
                    model, hidden[row], len(prompts[i]), completions[i], reduce, vocab_size, chunk_size
                )
            if progress:
                progress(len(rows))
    return results


def _final_hidden_states(model: Any, sequences: list[list[int]]) -> torch.Tensor:
    """The decoder's final (normed) hidden states [B, S, H] of right-padded `sequences`."""
    import torch

    width = max(len(s) for s in sequences)
    # the pad id does not matter: with right padding no real position attends to a padded one
    input_ids = torch.zeros((len(sequences), width), dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        input_ids[row, : len(sequence)] = torch.tensor(sequence)
        attention[row, : len(sequence)] = 1
    return model.get_decoder()(
        input_ids=input_ids.to(model.device), attention_mask=attention.to(model.device), use_cache=False
    ).last_hidden_state


def _reduce_chunks(
    model: Any,
    hidden: torch.Tensor,
    prompt_length: int,
    completion: Sequence[int],
    reduce: Callable[[torch.Tensor, torch.Tensor], R],
    vocab_size: int | None,
    chunk_size: int,
) -> list[R]:
    import torch

    if prompt_length == 0 and completion:
        raise ValueError("a completion is scored after a prompt of at least one token")
    head = model.get_output_embeddings()
    # the hidden state at position j predicts token j + 1
    states = hidden[prompt_length - 1 : prompt_length + len(completion) - 1]
    targets = torch.tensor(list(completion), dtype=torch.long, device=hidden.device)
    return [
        reduce(head(states[s : s + chunk_size])[:, :vocab_size], targets[s : s + chunk_size])
        for s in range(0, max(len(completion), 1), chunk_size)
    ]
