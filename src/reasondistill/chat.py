"""Chat prompts rendered by the model's own chat template: the one place prompts become token ids."""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from .records import Message


def prompt_ids(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message]) -> list[int]:
    """Token ids of a chat prompt, ending with the assistant's turn header, ready for the reply."""
    rendered = [m.model_dump() for m in messages]
    return tokenizer.apply_chat_template(
        rendered, add_generation_prompt=True, tokenize=True, return_dict=False
    )
