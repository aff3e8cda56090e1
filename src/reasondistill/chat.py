"""Chat prompts rendered by the model's own chat template: the one place prompts become token ids."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from .records import Message

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def prompt_ids(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Sequence[Message]]) -> list[list[int]]:
    """Token ids of chat prompts, each ending with the assistant's turn header, ready for the reply.

    Rendered to text with the template and then encoded in one batch (same ids as
    `apply_chat_template(tokenize=True)`, several times faster for many prompts).
    """
    texts = [
        tokenizer.apply_chat_template(
            [m.model_dump() for m in messages], add_generation_prompt=True, tokenize=False
        )
        for messages in prompts
    ]
    return encode_texts(tokenizer, texts)


def completion_ids(tokenizer: PreTrainedTokenizerBase, completions: Sequence[str]) -> list[list[int]]:
    """Token ids of assistant replies followed by the end-of-turn token, as the student is trained on
    them: tokenized apart from the prompt, so the prompt/completion boundary is exact."""
    return [[*ids, tokenizer.eos_token_id] for ids in encode_texts(tokenizer, completions)]


def encode_texts(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens, in one batch; none for no texts (transformers 5
    raises IndexError on an empty batch, and an empty set of traces is no reason to crash)."""
    if not texts:
        return []
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def user_text(messages: Sequence[Message]) -> str:
    """What the user's turns of a prompt say (the question, without the system prompt)."""
    return "\n\n".join(m.content for m in messages if m.role == "user")
