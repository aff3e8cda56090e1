"""Teacher and reference models beside the student: loading, the pre-flight check, heads and hidden states.

Token-level distillation compares distributions token id by token id, so teacher and student must
agree on what every id means. A mismatch (another tokenizer, another EOS, another chat template)
does not crash anything: it trains against the wrong tokens, silently. The pre-flight check runs
before the first step and refuses such pairs with one line saying what differs.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from ..errors import UserError
from ..models import load_causal_lm, load_config, load_tokenizer
from ..objectives.heads import Head

log = logging.getLogger(__name__)


def causal_lm(model: torch.nn.Module) -> PreTrainedModel:
    """The *ForCausalLM inside DDP / accelerate / PEFT wrappers."""
    while hasattr(model, "module"):  # DistributedDataParallel and friends
        model = model.module
    if hasattr(model, "get_base_model"):  # peft.PeftModel: LoRA layers live inside the base model
        model = model.get_base_model()
    return model


def head_rows(model: torch.nn.Module) -> int:
    return causal_lm(model).get_output_embeddings().weight.shape[0]


def check_head(model: torch.nn.Module, name: str) -> None:
    """Refuse models whose logits are not a plain projection of the final hidden states."""
    config = causal_lm(model).config
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        raise UserError(
            f"{name}: models that rescale their logits (final_logit_softcapping, logit_scale) are not "
            "supported: the loss projects hidden states with the output embeddings chunk by chunk"
        )


def output_head(model: torch.nn.Module, hidden: torch.Tensor, vocab_size: int | None) -> Head:
    head = causal_lm(model).get_output_embeddings()
    return Head(hidden, head.weight, getattr(head, "bias", None), vocab_size)


def final_hidden_states(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Final (normed) hidden states [B, S, H], without projecting every position to the vocabulary.

    The forward goes through `model` itself, wrappers included (DDP must see it to reduce gradients),
    with `logits_to_keep=1` so the head projects one position only; the decoder's output is taken
    with a forward hook.
    """
    captured: list[torch.Tensor] = []
    decoder = causal_lm(model).get_decoder()
    handle = decoder.register_forward_hook(lambda _module, _args, output: captured.append(output[0]))
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=1, use_cache=False)
    finally:
        handle.remove()
    return captured[-1]


def load_frozen(path: str | Path, device: torch.device, dtype: torch.dtype) -> PreTrainedModel:
    """A teacher or reference model in eval mode without gradients."""
    model = load_causal_lm(path, dtype=dtype).to(device).eval()
    model.requires_grad_(False)
    check_head(model, str(path))
    return model


def _first_difference(student: dict[str, int], teacher: dict[str, int]) -> str:
    for token, index in sorted(student.items(), key=lambda item: item[1]):
        if teacher.get(token) != index:
            where = f"id {teacher[token]}" if token in teacher else "absent"
            return f"token {token!r} is id {index} for the student, {where} for the teacher"
    extra = sorted(set(teacher) - set(student), key=teacher.get)[0]
    return f"token {extra!r} (teacher id {teacher[extra]}) is absent from the student's vocabulary"


def preflight(
    student: PreTrainedTokenizerBase,
    teacher: PreTrainedTokenizerBase,
    student_rows: int,
    teacher_rows: int,
    teacher_name: str,
) -> int:
    """Check that teacher and student share tokenizer, EOS and chat template; return the vocabulary size.

    Both heads are cut to the tokenizer's size: padded rows beyond it (Qwen2.5 pads 151,665 tokens
    to 151,936 rows, and to 152,064 in its larger sizes) are never a real token.
    """
    prefix = f"teacher {teacher_name} is not compatible with the student"
    if student.get_vocab() != teacher.get_vocab():
        raise UserError(
            f"{prefix}: different tokenizers: {_first_difference(student.get_vocab(), teacher.get_vocab())}"
        )
    if student.eos_token_id != teacher.eos_token_id:
        raise UserError(
            f"{prefix}: EOS differs: student {student.eos_token!r} (id {student.eos_token_id}), "
            f"teacher {teacher.eos_token!r} (id {teacher.eos_token_id})"
        )
    if student.chat_template != teacher.chat_template:
        raise UserError(
            f"{prefix}: chat templates differ, so the same conversation becomes different token ids "
            "(save the student's template with the teacher's tokenizer, or the reverse)"
        )
    tokens = len(student)
    if min(student_rows, teacher_rows) < tokens:
        raise UserError(
            f"{prefix}: a head has {min(student_rows, teacher_rows)} rows for a tokenizer of {tokens} tokens"
        )
    if max(student_rows, teacher_rows) > tokens:
        log.info(
            "vocabulary rows beyond the tokenizer's %d tokens (student %d, teacher %d) are padding: "
            "both heads are cut to the first %d rows",
            tokens,
            student_rows,
            teacher_rows,
            tokens,
        )
    return tokens


def load_beside_student(
    path: str | Path, student_tokenizer: PreTrainedTokenizerBase, student_rows: int, device, dtype
) -> tuple[PreTrainedModel, int]:
    """Run the pre-flight check, then load the frozen teacher/reference; return it with the vocabulary size.

    The check reads the tokenizer and config only, so an incompatible 70B teacher is refused in
    seconds, not after its weights are loaded.
    """
    tokenizer = load_tokenizer(path)
    config = load_config(path).get_text_config()
    shared = preflight(student_tokenizer, tokenizer, student_rows, config.vocab_size, str(path))
    return load_frozen(path, device, dtype), shared
