"""Teacher and reference models beside the student: loading, the pre-flight check, heads and hidden states.

Token-level distillation compares distributions token id by token id, so teacher and student must
agree on what every id means. A mismatch (another tokenizer, another EOS, another chat template)
does not crash anything: it trains against the wrong tokens, silently. The pre-flight check runs
before the first step and refuses such pairs with one line saying what differs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from ..generate.scoring import check_plain_logits
from ..models import load_causal_lm, load_config, load_tokenizer, shared_vocabulary
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
    """The output head's rows (a ZeRO-3 partition reports its whole shape as `ds_shape`)."""
    weight = causal_lm(model).get_output_embeddings().weight
    return getattr(weight, "ds_shape", weight.shape)[0]


def check_head(model: torch.nn.Module, name: str) -> None:
    """Refuse models whose logits are not a plain projection of the final hidden states."""
    check_plain_logits(
        causal_lm(model).config,
        name,
        "the loss projects hidden states with the output embeddings chunk by chunk",
    )


def output_head(model: torch.nn.Module, hidden: torch.Tensor, vocab_size: int | None) -> Head:
    head = causal_lm(model).get_output_embeddings()
    return Head(hidden, head.weight, getattr(head, "bias", None), vocab_size)


def partitioned(parameter: torch.Tensor) -> bool:
    """Whether DeepSpeed ZeRO-3 holds `parameter` in pieces (outside its module's forward it is empty)."""
    return hasattr(parameter, "ds_id")


def inside_forward(module: torch.nn.Module, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """`compute()` run as `module`'s forward, so that the hooks a sharding engine put on the module
    hold its parameters whole while `compute` reads them: ZeRO-3 gathers them before the forward and
    again before the backward of what it returned, and reduces their gradients as from any forward.
    The loss projects through the output head's weight outside the model's own forward; under ZeRO-3
    it is run inside the head module's forward this way."""
    original = module.forward
    module.forward = lambda *_args, **_kwargs: compute()
    try:
        return module(torch.empty(0))
    finally:
        module.forward = original


def final_hidden_states(
    model: torch.nn.Module, input_ids: torch.Tensor, layout: torch.Tensor | dict[str, torch.Tensor]
) -> torch.Tensor:
    """Final (normed) hidden states [B, S, H], without projecting every position to the vocabulary.

    `layout` is the attention mask of padded rows, or `{"position_ids": …}` for packed rows (each
    example's positions restart at 0; transformers then keeps attention within each example, with
    every attention kernel). The forward goes through `model` itself, wrappers included (DDP must see
    it to reduce gradients), with `logits_to_keep=1` so the head projects one position only; the
    decoder's output is taken with a forward hook.
    """
    if isinstance(layout, torch.Tensor):
        layout = {"attention_mask": layout}
    captured: list[torch.Tensor] = []
    decoder = causal_lm(model).get_decoder()
    handle = decoder.register_forward_hook(lambda _module, _args, output: captured.append(output[0]))
    try:
        model(input_ids=input_ids, **layout, logits_to_keep=1, use_cache=False)
    finally:
        handle.remove()
    return captured[-1]


def load_frozen(
    path: str | Path, device: torch.device, dtype: torch.dtype, attn_implementation: str | None = None
) -> PreTrainedModel:
    """A teacher or reference model in eval mode without gradients."""
    kernel = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = load_causal_lm(path, dtype=dtype, **kernel).to(device).eval()
    model.requires_grad_(False)
    check_head(model, str(path))
    return model


def preflight(
    student: PreTrainedTokenizerBase,
    teacher: PreTrainedTokenizerBase,
    student_rows: int,
    teacher_rows: int,
    teacher_name: str,
) -> int:
    """`shared_vocabulary` of a teacher beside the student: refuse a pair that numbers tokens
    differently, and say when padded head rows are cut to the tokenizer's size, which it returns."""
    tokens = shared_vocabulary(student, teacher, student_rows, teacher_rows, teacher_name)
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
    path: str | Path,
    student_tokenizer: PreTrainedTokenizerBase,
    student_rows: int,
    device,
    dtype,
    attn_implementation: str | None = None,
) -> tuple[PreTrainedModel, int]:
    """Run the pre-flight check, then load the frozen teacher/reference; return it with the vocabulary size.

    The check reads the tokenizer and config only, so an incompatible 70B teacher is refused in
    seconds, not after its weights are loaded.
    """
    tokenizer = load_tokenizer(path)
    config = load_config(path).get_text_config()
    shared = preflight(student_tokenizer, tokenizer, student_rows, config.vocab_size, str(path))
    return load_frozen(path, device, dtype, attn_implementation), shared
