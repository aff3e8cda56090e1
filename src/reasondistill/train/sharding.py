"""Which sharded-training setups the distillation loss is correct under, checked before weights load.

The loss projects the student's hidden states through the output head's weight outside the model's
forward (`objectives/heads.py`: chunk by chunk, never the whole [tokens, vocabulary] logits):
- FSDP2 (`fully_shard`, transformers' default FSDP) keeps that weight a DTensor between forwards, and
  the projection through it is exact: tests/fsdp2_run.py checks every gradient against the unsharded
  model on CPU processes;
- ZeRO-3 partitions it: outside a forward it is empty. The trainer then runs the loss as the head
  module's forward (`teachers.inside_forward`), where ZeRO-3 gathers it, and again before the
  backward pass: tests/zero3_run.py checks the weights after a step against the unsharded model;
- FSDP1 flattens parameters into shards: refused here, with the setup that works instead;
- DDP and ZeRO-1/2 hold the whole head in every process.
Setups come from `trainer_args` (fsdp, fsdp_config, deepspeed) or from an accelerate config, which
`accelerate launch` passes on in ACCELERATE_* / FSDP_* variables.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from ..errors import UserError

# fsdp_config keys transformers 5.x reads (training_args.py), without their optional `fsdp_` prefix
FSDP_OPTIONS = frozenset({
    "version", "min_num_params", "transformer_layer_cls_to_wrap", "auto_wrap_policy", "reshard_after_forward",
    "cpu_offload", "offload_params", "cpu_ram_efficient_loading", "state_dict_type", "activation_checkpointing",
    "forward_prefetch", "backward_prefetch", "use_orig_params", "sync_module_states", "limit_all_gathers",
    "xla", "xla_fsdp_settings", "xla_fsdp_grad_ckpt",
})  # fmt: skip
SHARDED_HEAD = "the loss reads the output head outside the model's forward"


def check_sharding(trainer_args: Mapping, environ: Mapping[str, str], description: str) -> None:
    """Refuse, in one line, an FSDP setup the loss is not correct under, an invalid one, or DeepSpeed
    where it is not installed."""
    fsdp_asked = bool(trainer_args.get("fsdp")) or _true(environ.get("ACCELERATE_USE_FSDP"))
    if fsdp_asked:
        config = trainer_args.get("fsdp_config") or {}
        if isinstance(config, str | Path):
            config = _json(config, "trainer_args.fsdp_config", description)
        unknown = sorted(key for key in config if key.removeprefix("fsdp_") not in FSDP_OPTIONS)
        if unknown:
            raise UserError(
                f"{description}: trainer_args.fsdp_config.{unknown[0]}: unknown FSDP option; known: "
                f"{', '.join(sorted(FSDP_OPTIONS))}"
            )
        version = config.get("version", config.get("fsdp_version"))
        if version is None:  # transformers' default is FSDP2, accelerate's (FSDP_VERSION unset) FSDP1
            version = 2 if trainer_args.get("fsdp") else environ.get("FSDP_VERSION", 1)
        if int(version) != 2:
            raise UserError(
                f"{description}: FSDP version {version} flattens the parameters into shards and {SHARDED_HEAD}: "
                "use FSDP2 (fsdp_config: {version: 2}, or fsdp_version: 2 in the accelerate config)"
            )
    if _deepspeed_asked(trainer_args, environ, description):
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise UserError(
                f"{description}: DeepSpeed is asked for but not installed (pip install deepspeed)"
            ) from None


def _deepspeed_asked(trainer_args: Mapping, environ: Mapping[str, str], description: str) -> bool:
    """Whether DeepSpeed is asked for (any ZeRO stage works); a config file must exist and be JSON."""
    config = trainer_args.get("deepspeed") or environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if isinstance(config, str | Path):
        _json(config, "trainer_args.deepspeed", description)
    return bool(config) or _true(environ.get("ACCELERATE_USE_DEEPSPEED"))


def _json(path: str | Path, what: str, description: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"{description}: {what}: {path} not found") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{description}: {what}: {path} is not valid JSON ({err.msg})") from None


def _true(value: str | None) -> bool:
    return str(value).lower() in ("1", "true", "yes")
