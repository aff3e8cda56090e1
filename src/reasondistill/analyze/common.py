"""What the analyses that score text with models share: the same-tokenizer check, the teacher-forced
log-probabilities of completion tokens, and the fast tokenizer that maps tokens to characters."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..errors import UserError
from ..generate.scoring import teacher_forced


# ---- models ---------------------------------------------------------------------------------------
def check_same_tokenizer(tokenizers: Sequence[tuple[str, PreTrainedTokenizerBase]], purpose: str) -> None:
    """Refuse models that do not number tokens alike (vocabulary, EOS, chat template)."""
    (first_name, first), *others = tokenizers
    for name, other in others:
        difference = None
        if first.get_vocab() != other.get_vocab():
            vocab, theirs = first.get_vocab(), other.get_vocab()
            token = next(
                (t for t, i in sorted(vocab.items(), key=lambda x: x[1]) if theirs.get(t) != i), None
            )
            difference = (
                f"token {token!r} is id {vocab[token]} for {first_name}, "
                f"{'id ' + str(theirs[token]) if token in theirs else 'absent'} for {name}"
                if token is not None
                else f"{name} has {len(theirs) - len(vocab)} more tokens"
            )
        elif first.eos_token_id != other.eos_token_id:
            difference = f"EOS {first.eos_token!r} for {first_name}, {other.eos_token!r} for {name}"
        elif first.chat_template != other.chat_template:
            difference = "the chat templates differ, so one conversation becomes different token ids"
        if difference:
            raise UserError(
                f"{purpose} needs models that share one tokenizer; {first_name} and {name} do not: {difference}"
            )


def completion_logprobs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[list[int]],
    completions: Sequence[list[int]],
    batch_size: int,
    progress: Callable[[int], None] | None = None,
) -> list[np.ndarray]:
    """log p(token | prompt, earlier completion tokens) of every completion token, float32.

    Teacher-forced (`teacher_forced`), batched by length; rows of the head beyond the tokenizer
    (padding) are left out of the softmax, as in the hf backend.
    """
    real_tokens = min(len(tokenizer), model.get_output_embeddings().weight.shape[0])
    chunks = teacher_forced(
        model, prompts, completions, _chosen_logprobs,
        batch_size=batch_size, vocab_size=real_tokens, by_length=True, progress=progress,
    )  # fmt: skip
    return [torch.cat(parts).cpu().numpy().astype(np.float32) for parts in chunks]


def _chosen_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[:, None])[:, 0]


def fast_tokenizer(tokenizer: PreTrainedTokenizerBase, name: str) -> PreTrainedTokenizerBase:
    if not tokenizer.is_fast:
        raise UserError(
            f"{name}: a fast (Rust) tokenizer is needed to map tokens to sentences (character offsets)"
        )
    return tokenizer
