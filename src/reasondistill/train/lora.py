"""LoRA on the student (peft): its options, the pre-flight of its target modules, and the model it wraps.

The student's linear layers get low-rank adapters; every objective is unchanged (the loss reads the
student's final hidden states and its output head, which LoRA leaves alone: adapters on the output
head or the embeddings are refused, since the chunked loss projects with the head's own weight). The
teacher and reference stay frozen, unadapted. The trained model is saved as an adapter (its
`adapter_config.json` names the base model; `models.load_causal_lm` loads base + adapter wherever a
model reference is read) or merged into full weights (`merge: true`).

QLoRA (`quantize: 4bit`): the frozen base loads in 4-bit NF4 through bitsandbytes (double
quantization, bfloat16 compute; the output head stays unquantized, as transformers leaves it), prepared
with peft's `prepare_model_for_kbit_training`, and the adapters train in full precision. It needs a
CUDA GPU and bitsandbytes; elsewhere it is refused before any weights load. Not yet run by this
project: no GPU was lent so far (scripts/gpu_check.sh runs it where one is).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..errors import UserError


class LoraOptions(BaseModel):
    """`train.lora`: low-rank adapters on the student's linear layers (peft's LoraConfig)."""

    model_config = ConfigDict(extra="forbid")

    r: int = Field(16, ge=1, description="rank of each adapter")
    alpha: float = Field(32.0, gt=0, description="scale numerator: the update is (alpha / r)·B·A")
    dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the adapter's input")
    target_modules: list[str] | None = Field(
        None,
        description="names (or name suffixes) of the linear layers to adapt, e.g. [q_proj, v_proj]; "
        "default: every linear layer but the output head (peft's all-linear)",
    )
    merge: bool = Field(
        False, description="save the adapters merged into full weights instead of as an adapter folder"
    )
    quantize: Literal["4bit"] | None = Field(
        None, description="QLoRA: load the frozen base in 4-bit NF4 (bitsandbytes; a CUDA GPU)"
    )


def check_targets(options: LoraOptions, init: str | Path, description: str) -> None:
    """Refuse, before any weights load, target modules the model does not have, adapters on the
    output head or the embeddings, and QLoRA where it cannot run. The module names come from the
    model built on the meta device."""
    if options.quantize:
        _check_quantization(options, description)
    if options.target_modules is None:
        return
    names = _module_names(init)
    head = {"lm_head", "embed_tokens", "wte", "embed_out", "output"}
    for target in options.target_modules:
        if target.split(".")[-1] in head:
            raise UserError(
                f"{description}: lora.target_modules: {target!r} is the output head or the embeddings; the "
                "loss projects with the head's own weight, so adapt the transformer's linear layers only"
            )
        if not any(name == target or name.endswith(f".{target}") for name in names):
            linear = sorted(
                {name.rsplit(".", 1)[-1] for name in names if name.rsplit(".", 1)[-1] not in head}
            )
            raise UserError(
                f"{description}: lora.target_modules: the model has no module {target!r}; its linear layers "
                f"are named {', '.join(linear)}"
            )


def _check_quantization(options: LoraOptions, description: str) -> None:
    import importlib.util

    import torch

    if options.merge:
        raise UserError(
            f"{description}: lora.merge with lora.quantize: adapters cannot be merged into 4-bit weights; "
            "save the adapter (merge: false) and merge it into the full-precision base later"
        )
    if not torch.cuda.is_available():
        raise UserError(f"{description}: lora.quantize (QLoRA) needs a CUDA GPU; this machine has none")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(f"{description}: lora.quantize (QLoRA) needs bitsandbytes (pip install bitsandbytes)")


def quantized_loading(options: LoraOptions | None) -> dict:
    """`from_pretrained` arguments that load the base in 4 bits for QLoRA ({} otherwise)."""
    if options is None or not options.quantize:
        return {}
    import torch
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    return {"quantization_config": config, "device_map": {"": torch.cuda.current_device()}}


def _module_names(init: str | Path) -> list[str]:
    """The names of the model's linear layers, from its config alone (no weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    from ..models import load_config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(load_config(init))
    return [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]


def with_lora(model, options: LoraOptions, seed: int):
    """`model` wrapped by peft with trainable adapters, their initial weights drawn from `seed` (the
    same adapters on every run with the same seed); its own weights frozen."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if options.quantize:  # frozen 4-bit base: norms in float32, input gradients for the adapters
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = LoraConfig(
        r=options.r,
        lora_alpha=options.alpha,
        lora_dropout=options.dropout,
        target_modules=options.target_modules or "all-linear",
        task_type="CAUSAL_LM",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(model, config)


def trainable_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
