"""Chat prompts rendered by the model's own chat template: the one place prompts become token ids.

Reasoning templates. Some templates (DeepSeek-R1-Distill's) end the generation prompt with the
opening `<think>\n` of the reasoning block, so the model's reply starts inside it. A completion's
text is always the whole reply, opener included (the backends add it, see `with_opener`); its token
ids are what follows the prompt, so `completion_ids` leaves out an opener the prompt already holds.
`reasoning_preflight` checks a student's (and a teacher's) template and tokenizer for the rest.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .records import Message

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


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
    them: tokenized apart from the prompt, so the prompt/completion boundary is exact. A reasoning
    opener that the prompt already ends with is not repeated (see `without_opener`)."""
    opener = reasoning_opener(tokenizer)
    replies = [without_opener(c, opener) for c in completions] if opener else completions
    return [[*ids, tokenizer.eos_token_id] for ids in encode_texts(tokenizer, replies)]


def reasoning_opener(tokenizer: PreTrainedTokenizerBase) -> str:
    """What the template's generation prompt ends with to open the reasoning block ("<think>\n" for
    DeepSeek-R1-Distill), or "" when the model opens it itself."""
    probe = [{"role": "user", "content": "?"}]
    text = tokenizer.apply_chat_template(probe, add_generation_prompt=True, tokenize=False)
    at = text.rfind(THINK_OPEN)
    return text[at:] if at >= 0 and not text[at + len(THINK_OPEN) :].strip() else ""


def with_opener(text: str, opener: str) -> str:
    """A reply generated after a prompt ending with `opener`, as the whole reply: the opener first."""
    return text if not opener or text.lstrip().startswith(THINK_OPEN) else opener + text


def without_opener(text: str, opener: str) -> str:
    """What a model writes after a prompt ending with `opener` to reply `text` (the inverse of
    `with_opener`): a leading `<think>` and the whitespace after it are the prompt's."""
    stripped = text.lstrip()
    if not opener or not stripped.startswith(THINK_OPEN):
        return text
    rest = stripped[len(THINK_OPEN) :]
    tail = opener[len(THINK_OPEN) :]  # the whitespace the opener puts after the tag
    return rest[len(tail) :] if rest.startswith(tail) else rest.lstrip()


def encode_texts(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens, in one batch; none for no texts (transformers 5
    raises IndexError on an empty batch, and an empty set of traces is no reason to crash)."""
    if not texts:
        return []
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def user_text(messages: Sequence[Message]) -> str:
    """What the user's turns of a prompt say (the question, without the system prompt)."""
    return "\n\n".join(m.content for m in messages if m.role == "user")


# ---- pre-flight of reasoning templates ----------------------------------------------------------


@dataclass
class ReasoningCheck:
    """What `reasoning_preflight` found: facts to record, and problems to warn or fail about."""

    opener: str  # the reasoning opener the generation prompt ends with ("" if none)
    think_tokens: dict[str, dict[str, list[str]]]  # {"student"|"teacher": {tag: its tokens}}
    history_keeps_reasoning: (
        bool | None
    )  # the template keeps earlier turns' reasoning (None: cannot render them)
    trained_keeps_reasoning: bool  # the completion's tokens, as trained, hold its whole reasoning block
    differences: list[str] = field(default_factory=list)  # what to warn about, each named

    def as_stats(self) -> dict:
        return {
            "opener": self.opener,
            "think_tokens": self.think_tokens,
            "history_keeps_reasoning": self.history_keeps_reasoning,
            "trained_keeps_reasoning": self.trained_keeps_reasoning,
            "differences": self.differences,
        }


_PROBE_REASONING = "Twelve plus thirty is forty-two."


def reasoning_preflight(
    student: PreTrainedTokenizerBase, teacher: PreTrainedTokenizerBase | None = None
) -> ReasoningCheck:
    """Check a student's chat template and tokenizer (and a teacher's) for reasoning traces.

    - `<think>` / `</think>` tokenize the same way in teacher and student, or each difference is named
      (a single added token for one, several pieces for the other: distilling token by token, or a
      student learning to close its block, depends on it).
    - The completion being trained on keeps its reasoning block: the probe example is turned into
      token ids as training does (prompt, then completion) and its labelled part must hold the
      reasoning and `</think>`. Templates that strip reasoning from earlier assistant turns (R1's
      does) are reported: rendering the whole conversation through such a template, as chat-format
      SFT trainers do, would train on answers without their reasoning.
    """
    tokenizers = {"student": student, **({"teacher": teacher} if teacher is not None else {})}
    think_tokens = {
        role: {
            tag: tok.convert_ids_to_tokens(encode_texts(tok, [tag])[0]) for tag in (THINK_OPEN, THINK_CLOSE)
        }
        for role, tok in tokenizers.items()
    }
    differences = [
        f"{tag} is a special token of the {role}'s tokenizer: decoding with skip_special_tokens drops it, "
        "and the reasoning block with it"
        for role, tok in tokenizers.items()
        for tag in (THINK_OPEN, THINK_CLOSE)
        if tag in tok.all_special_tokens
    ]
    if teacher is not None:
        for tag in (THINK_OPEN, THINK_CLOSE):
            ours, theirs = think_tokens["student"][tag], think_tokens["teacher"][tag]
            if ours != theirs:
                differences.append(
                    f"{tag} is {len(theirs)} token(s) {theirs} for the teacher and {len(ours)} {ours} for the student"
                )
    reply = f"{THINK_OPEN}\n{_PROBE_REASONING}\n{THINK_CLOSE}\n\nThe answer is 42."
    trained = student.decode(completion_ids(student, [reply])[0])
    opener = reasoning_opener(student)
    # the block is opened once: by the prompt, or by the completion
    opened_once = bool(opener) != trained.lstrip().startswith(THINK_OPEN)
    return ReasoningCheck(
        opener=opener,
        think_tokens=think_tokens,
        history_keeps_reasoning=_keeps_earlier_reasoning(student, reply),
        trained_keeps_reasoning=_PROBE_REASONING in trained and THINK_CLOSE in trained and opened_once,
        differences=differences,
    )


def _keeps_earlier_reasoning(tokenizer: PreTrainedTokenizerBase, reply: str) -> bool | None:
    """Whether the template renders an earlier assistant turn with its reasoning (None: it refuses
    to render such a conversation at all; some templates check roles)."""
    conversation = [
        {"role": "user", "content": "What is 12 + 30?"},
        {"role": "assistant", "content": reply},
        {"role": "user", "content": "And 1 + 1?"},
    ]
    try:
        return _PROBE_REASONING in tokenizer.apply_chat_template(conversation, tokenize=False)
    except Exception:  # jinja2's TemplateError or whatever a template raises
        return None
