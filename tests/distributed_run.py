"""Train tiny students with DistillationTrainer and write what each run did, for test_distributed.py.

Run as `python distributed_run.py OUT_DIR RUN...` (one process) or under `accelerate launch` (several);
each RUN is `name:objective:per_device_batch:accumulation` (a name starting with `lora` trains LoRA
adapters; one starting with `fsdp` asks for FSDP2 on several processes). Every rank writes `OUT_DIR/rank<R>.json`:
per run, the logged loss and gradient norm of every optimizer step, the final parameters and the
objective's state.
"""

import json
import os
import random
import sys
import warnings
from pathlib import Path

import torch
from datasets import Dataset
from transformers import Qwen2Config, Qwen2ForCausalLM, TrainingArguments
from transformers.utils import logging as hf_logging

from reasondistill.objectives import make_objective
from reasondistill.objectives.base import IGNORE_INDEX
from reasondistill.train.data import CompletionCollator
from reasondistill.train.lora import LoraOptions, with_lora
from reasondistill.train.trainer import DistillationTrainer

EXAMPLES = 16  # 4 optimizer steps per epoch at a global batch of 4
ON_GPU = os.environ.get("DISTRIBUTED_RUN_DEVICE") == "cuda"
VOCAB = 48


def examples() -> Dataset:
    """Prompts of 1-6 tokens and completions of 1-20, so each process's share of tokens differs."""
    rng = random.Random(0)
    rows = []
    for i in range(EXAMPLES):
        prompt, completion = rng.randint(1, 6), [1, 20, 3, 12][i % 4] + rng.randint(0, 2)
        ids = [rng.randrange(2, VOCAB) for _ in range(prompt + completion)]
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:], "length": len(ids)})
    return Dataset.from_list(rows)


def device() -> torch.device:
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if ON_GPU else torch.device("cpu")


def whole(parameter: torch.Tensor) -> torch.Tensor:
    """A parameter as one tensor on the CPU (FSDP2 holds each process's shard as a DTensor)."""
    full = parameter.full_tensor() if hasattr(parameter, "full_tensor") else parameter
    return full.detach().float().cpu()


def tiny_model(seed: int) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    return Qwen2ForCausalLM(config)


def train(out_dir: Path, name: str, objective: str, batch: int, accumulation: int) -> dict:
    student = tiny_model(seed=0)
    if name.startswith("lora"):  # adapters on every linear layer but the head, the rest frozen
        student = with_lora(student, LoraOptions(r=4, alpha=8, dropout=0.0), seed=0)
    teacher = None
    if objective != "sft":
        teacher = tiny_model(seed=1).eval().requires_grad_(False).to(device())
        with torch.no_grad():  # a peaked teacher, so the divergence is far from zero
            teacher.lm_head.weight.mul_(30)
    sharded = {}
    if name.startswith("fsdp") and int(os.environ.get("WORLD_SIZE", 1)) > 1:  # FSDP2 (on CPU: not enabled)
        sharded = {"fsdp": "full_shard", "fsdp_config": {"version": 2}}
    args = TrainingArguments(
        **sharded,
        output_dir=str(out_dir / name),
        use_cpu=not ON_GPU,  # gloo under `accelerate launch`; scripts/gpu_check.sh runs it on GPUs
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        num_train_epochs=2,
        learning_rate=1.0,
        optim="sgd",  # the update is the gradient itself: a wrong loss scale shows in the weights
        lr_scheduler_type="constant",
        logging_steps=1,
        seed=0,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        dataloader_pin_memory=False,
        remove_unused_columns=False,  # the sampler reads `length`
    )
    loss = make_objective(objective)
    trainer = DistillationTrainer(
        model=student,
        args=args,
        train_dataset=examples(),
        data_collator=CompletionCollator(0),
        objective=loss,
        teacher=teacher,
        sort_within_step=True,  # as train_model does
    )
    before = [whole(p).clone() for p in student.parameters() if p.requires_grad]
    trainer.train()
    after = [whole(p) for p in trainer.model.parameters() if p.requires_grad]
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    return {
        "world_size": args.world_size,
        "examples_per_step": args.world_size * batch * accumulation,
        "steps": trainer.state.global_step,
        "loss": [entry["loss"] for entry in logs],
        "grad_norm": [entry["grad_norm"] for entry in logs],
        "parameters": torch.cat([whole(p).flatten() for p in trainer.model.parameters()]).tolist(),
        "objective_state": loss.state_dict(),  # TAID's t: moved by the loss summed over the processes
        "moved": sum(
            float((a - b).abs().sum()) for a, b in zip(after, before, strict=True)
        ),  # trainable weights
    }


def main() -> None:
    warnings.filterwarnings("ignore")
    hf_logging.set_verbosity_error()
    torch.set_num_threads(1)
    out_dir = Path(sys.argv[1])
    runs = {}
    for spec in sys.argv[2:]:
        name, objective, batch, accumulation = spec.split(":")
        runs[name] = train(out_dir, name, objective, int(batch), int(accumulation))
    rank = int(os.environ.get("RANK", 0))
    (out_dir / f"rank{rank}.json").write_text(json.dumps(runs))
    if torch.distributed.is_initialized():  # before interpreter shutdown, where gloo's threads may abort
        torch.distributed.barrier()  # no process tears down a connection another is still using
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
