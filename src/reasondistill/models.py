"""Loading models, tokenizers and configs: the one place reasondistill calls `from_pretrained`.

Remote code. A model folder or Hub repository can ship Python files (`auto_map` in config.json or
tokenizer_config.json) that transformers would import and run. reasondistill runs such code only when
the user asked for it with `--trust-remote-code` (before the command: `reasondistill
--trust-remote-code train …`) or `trust_remote_code: true` in a recipe. The setting is process-wide,
recorded in every step of the run's manifest, and passed explicitly by every loader here, so
transformers never asks on stdin. By default a local folder with `auto_map` is refused before anything
loads; a Hub repository's custom code is refused by transformers, and that refusal becomes one line.

Pre-flight. `check_model_folder` finds a local folder's problems in milliseconds, before a step starts
work: no config.json, an architecture this transformers does not know, no tokenizer, a tokenizer
without a chat template, weights only in a pickle checkpoint that a weights-only load refuses. Hub ids
are checked when they load (errors become one line naming the id).
"""

from __future__ import annotations

import json
import pickle
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from .config import StageConfig
from .errors import UserError

REMOTE_CODE_OPTION = "--trust-remote-code (recipe: `trust_remote_code: true`)"
_SAFE_WEIGHTS = ("*.safetensors",)
_PICKLE_WEIGHTS = ("pytorch_model*.bin",)  # what transformers loads besides safetensors

_trust_remote_code = False


def set_trust_remote_code(allowed: bool) -> None:
    """Allow (or forbid, the default) running code shipped with models, for every later load."""
    global _trust_remote_code
    _trust_remote_code = bool(allowed)


def trust_remote_code() -> bool:
    return _trust_remote_code


@contextmanager
def remote_code_allowed_if(allowed: bool) -> Iterator[None]:
    """Within the block, allow remote code if `allowed` (or if it already was); then as before."""
    previous = _trust_remote_code
    set_trust_remote_code(previous or allowed)
    try:
        yield
    finally:
        set_trust_remote_code(previous)


# ---- pre-flight ---------------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(content, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(content).__name__}")
    return content


def _has_chat_template(folder: Path, tokenizer_config: dict) -> bool:
    return bool(tokenizer_config.get("chat_template")) or any(
        (folder / name).is_file() for name in ("chat_template.jinja", "chat_template.json")
    )


def check_model_folder(
    path: str | Path, *, model: bool = True, chat_template: bool = True, weights: bool = True
) -> None:
    """Refuse a local folder that cannot be used, with one line naming the folder and the problem.

    Always: remote code, a tokenizer, and an architecture transformers knows where there is a
    config.json. With `model`: a config.json (a tokenizer-only folder needs none); with
    `chat_template`: a tokenizer chat template (prompts are rendered with it); with `weights`: weights
    that a safe load accepts. A LoRA adapter folder is checked as its base model (config, weights) and
    its own tokenizer. A path that is not a local folder (a Hub id) is left to the loaders.
    """
    folder = Path(path)
    if not folder.is_dir():
        return
    base = adapter_base(folder)
    if base is not None:  # a LoRA adapter: the base model's config and weights, its own tokenizer
        if model:
            check_model_folder(base, chat_template=False, weights=weights)
            if weights and not (folder / "adapter_model.safetensors").is_file():
                raise UserError(f"{folder}: a LoRA adapter without adapter_model.safetensors")
        model = False  # the folder itself holds no config.json: check its tokenizer below
    config_path, tokenizer_path = folder / "config.json", folder / "tokenizer_config.json"
    if model and not config_path.is_file():
        raise UserError(
            f"{folder}: no config.json; expected a model folder (config.json, tokenizer, weights)"
        )
    config = _read_json(config_path) if config_path.is_file() else {}
    tokenizer_config = _read_json(tokenizer_path) if tokenizer_path.is_file() else {}
    shipped_code = [
        p.name for p, c in ((config_path, config), (tokenizer_path, tokenizer_config)) if "auto_map" in c
    ]
    if shipped_code and not _trust_remote_code:
        raise UserError(
            f"{folder}: ships its own Python code (auto_map in {', '.join(shipped_code)}), which is not run "
            f"unless you pass {REMOTE_CODE_OPTION}"
        )
    if (model or config) and not shipped_code:
        _check_architecture(config_path, config)
    if not tokenizer_path.is_file() and not (folder / "tokenizer.json").is_file():
        raise UserError(f"{folder}: no tokenizer (tokenizer.json or tokenizer_config.json)")
    if chat_template and not _has_chat_template(folder, tokenizer_config):
        raise UserError(
            f"{folder}: the tokenizer has no chat template (chat_template in tokenizer_config.json or "
            "chat_template.jinja); prompts are rendered with it, so add one or use an instruct model"
        )
    if model and weights:
        _check_weights(folder)


def _check_architecture(config_path: Path, config: dict) -> None:
    from transformers import __version__
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    model_type = config.get("model_type")
    if model_type is None:
        raise UserError(f"{config_path}: no model_type; expected a transformers model config")
    if model_type not in CONFIG_MAPPING_NAMES:
        raise UserError(
            f"{config_path}: model_type {model_type!r} is not an architecture transformers "
            f"{__version__} knows"
        )


def _check_weights(folder: Path) -> None:
    if any(any(folder.glob(pattern)) for pattern in _SAFE_WEIGHTS):
        return
    pickled = sorted(p for pattern in _PICKLE_WEIGHTS for p in folder.glob(pattern))
    if not pickled:
        raise UserError(f"{folder}: no weights (*.safetensors or pytorch_model.bin)")
    import torch

    for checkpoint in pickled:  # a zip checkpoint is memory-mapped: its pickle is read, not its tensors
        try:
            torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(checkpoint))
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UserError(
                f"{checkpoint}: a pickle checkpoint that a safe (weights-only) load refuses ({reason}); "
                "use safetensors weights"
            ) from None


# ---- loaders ------------------------------------------------------------------------------------


def _from_pretrained(load, path: str | Path, what: str, **kwargs) -> Any:
    """`load(path, trust_remote_code=…, **kwargs)`, with its refusals and missing files as one line."""
    try:
        return load(str(path), trust_remote_code=_trust_remote_code, **kwargs)
    except pickle.UnpicklingError as err:
        raise UserError(f"{path}: {what}: a pickle checkpoint that a safe load refuses ({err})") from None
    except ValueError as err:
        if "trust_remote_code" in str(err):
            raise UserError(
                f"{path}: ships its own Python code, which is not run unless you pass {REMOTE_CODE_OPTION}"
            ) from None
        if "Unrecognized" in str(err) or "does not recognize" in str(
            err
        ):  # a Hub model of another architecture
            raise UserError(f"{path}: {str(err).strip().splitlines()[0]}") from None
        raise
    except OSError as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{path}: cannot load the {what} ({first_line})") from None


def load_tokenizer(path: str | Path, *, chat_template: bool = True, **kwargs):
    """The tokenizer at `path`; with `chat_template`, one that has a chat template (else UserError)."""
    from transformers import AutoTokenizer

    check_model_folder(path, model=False, chat_template=chat_template)
    tokenizer = _from_pretrained(AutoTokenizer.from_pretrained, path, "tokenizer", **kwargs)
    if chat_template and not tokenizer.chat_template:
        raise UserError(f"{path}: the tokenizer has no chat template; prompts are rendered with it")
    return tokenizer


def load_config(path: str | Path, **kwargs):
    """The model config at `path` (an adapter's: its base model's)."""
    from transformers import AutoConfig

    base = adapter_base(path)
    if base is not None:
        return load_config(base, **kwargs)
    check_model_folder(path, weights=False, chat_template=False)
    return _from_pretrained(AutoConfig.from_pretrained, path, "config", **kwargs)


def load_causal_lm(path: str | Path, **kwargs):
    """A causal language model (`AutoModelForCausalLM.from_pretrained(path, **kwargs)`), pre-flighted.
    A LoRA adapter folder loads its base model with the adapter merged in."""
    from transformers import AutoModelForCausalLM

    check_model_folder(path, chat_template=False)
    base = adapter_base(path)
    if base is not None:
        from peft import PeftModel

        merged = PeftModel.from_pretrained(load_causal_lm(base, **kwargs), str(path)).merge_and_unload()
        return merged.requires_grad_(True)  # as from_pretrained leaves a model (peft froze the base)
    return _from_pretrained(AutoModelForCausalLM.from_pretrained, path, "model", **kwargs)


def adapter_base(path: str | Path) -> str | None:
    """The base model of a LoRA adapter folder (`adapter_config.json`, no `config.json`), else None."""
    folder = Path(path)
    adapter = folder / "adapter_config.json"
    if not adapter.is_file() or (folder / "config.json").is_file():
        return None
    base = _read_json(adapter).get("base_model_name_or_path")
    if not base:
        raise UserError(f"{adapter}: no base_model_name_or_path; cannot tell which model it adapts")
    return base


# ---- dtype and attention kernel -----------------------------------------------------------------

DTypeName = Literal["auto", "bfloat16", "float16", "float32"]


class ModelLoading(StageConfig):
    """How a step loads the models it runs (teachers, students, references): their weights' dtype and
    the attention kernel."""

    dtype: DTypeName = Field(
        "auto",
        description="dtype of the weights of the models this step runs: auto (bfloat16 on a GPU that "
        "supports it, else float32; vllm: its own auto), bfloat16, float16 or float32",
    )
    attn_implementation: str | None = Field(
        None,
        description="hf: transformers' attention kernel (sdpa, eager, flash_attention_2, …); "
        "default: transformers' choice",
    )

    def loading(self) -> dict[str, Any]:
        """These options as the keyword arguments of `HFGenerator` (and of `loading_kwargs`)."""
        return {"dtype": self.dtype, "attn_implementation": self.attn_implementation}


def torch_dtype(name: str, device: Any = None):
    """The torch dtype named `name`; `auto`: bfloat16 on a CUDA `device` that supports it, else float32."""
    import torch

    if name == "auto":
        cuda = device is not None and torch.device(device).type == "cuda"
        return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def loading_kwargs(dtype: str, attn_implementation: str | None, device: Any = None) -> dict:
    """`from_pretrained` keyword arguments for a model loaded in `dtype` with `attn_implementation`."""
    kwargs: dict[str, Any] = {"dtype": torch_dtype(dtype, device)}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    return kwargs


# What a generation_config.json holds besides special token ids and output plumbing: sampling
# defaults (a repetition penalty, top-k, min-p …) that transformers would apply to every generate()
# call leaving them unset.
NOT_SAMPLING = {
    "bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "transformers_version",
    "use_cache", "output_attentions", "output_hidden_states", "output_scores", "output_logits",
    "return_dict_in_generate",
}  # fmt: skip


def sampling_defaults(generation_config) -> dict:
    """The sampling settings of a `GenerationConfig` (None: none): what differs from transformers' defaults."""
    own = generation_config.to_diff_dict() if generation_config is not None else {}
    return {k: v for k, v in sorted(own.items()) if k not in NOT_SAMPLING and not k.startswith("_")}


def model_sampling_defaults(path: str | Path) -> dict:
    """`sampling_defaults` of the generation_config.json in a model folder ({} without one)."""
    folder = Path(path)
    if not (folder / "generation_config.json").is_file():
        return {}
    from transformers import GenerationConfig

    return sampling_defaults(GenerationConfig.from_pretrained(folder))


# ---- a pair of models ---------------------------------------------------------------------------


def shared_vocabulary(
    student: Any, teacher: Any, student_rows: int, teacher_rows: int, teacher_name: str
) -> int:
    """Check that two tokenizers (student's, teacher's) number tokens alike; return the tokenizer's size.

    Comparing distributions token id by token id (distillation, a student gating a teacher's
    decoding) needs the same vocabulary, EOS and chat template; a mismatch trains or gates against
    the wrong tokens silently, so it is refused with one line saying what differs. Both heads need a
    row for every token; rows beyond the tokenizer (Qwen2.5 pads 151,665 tokens to 151,936 rows, and
    to 152,064 in its larger sizes) are padding, never a real token, and are cut by the callers.
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
    return tokens


def _first_difference(student: dict[str, int], teacher: dict[str, int]) -> str:
    for token, index in sorted(student.items(), key=lambda item: item[1]):
        if teacher.get(token) != index:
            where = f"id {teacher[token]}" if token in teacher else "absent"
            return f"token {token!r} is id {index} for the student, {where} for the teacher"
    extra = sorted(set(teacher) - set(student), key=teacher.get)[0]
    return f"token {extra!r} (teacher id {teacher[extra]}) is absent from the student's vocabulary"
