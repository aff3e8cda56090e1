"""The distillation loss on a student sharded with FSDP2 (`fully_shard`), for test_distributed.py.

Run as `torchrun --standalone --nproc-per-node 2 fsdp2_run.py OUT_DIR` (CPU processes, gloo). The
loss path is the trainer's: the final hidden states from the wrapped model's forward, then the output
head's weight read outside that forward and projected chunk by chunk (`output_head`). Each process
takes half of a batch; its gradients, reduced by FSDP, must equal those of the unsharded model on the
whole batch. Every rank writes `OUT_DIR/rank<R>.json`: per case, the largest difference of any
parameter's gradient relative to that parameter's largest gradient.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers import Qwen2Config, Qwen2ForCausalLM

from reasondistill.objectives import make_objective
from reasondistill.objectives.base import ObjectiveInputs
from reasondistill.objectives.heads import SparseTargets
from reasondistill.train.teachers import final_hidden_states, output_head

VOCAB, HIDDEN, BATCH, LENGTH = 64, 16, 4, 9
CASES = {  # name: (objective, teacher, tied input and output embeddings)
    "sft": ("sft", None, False),
    "sft-tied": ("sft", None, True),
    "forward-kl-online": ("forward_kl", "online", False),
    "reverse-kl-online-tied": ("reverse_kl", "online", True),
    "forward-kl-stored": ("forward_kl", "stored", False),
}


def tiny(seed: int, tied: bool) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=tied,
    )  # fmt: skip
    return Qwen2ForCausalLM(config)


def stored_targets(teacher: Qwen2ForCausalLM, ids: torch.Tensor) -> SparseTargets:
    """The teacher's top-8 at each predicted position, as a store holds them."""
    with torch.no_grad():
        logprobs = teacher(input_ids=ids).logits[:, :-1].reshape(-1, VOCAB).log_softmax(-1)
    top, top_ids = logprobs.topk(8, dim=-1)
    tail = torch.log1p(-top.exp().sum(-1).clamp(max=1 - 1e-6))
    return SparseTargets(top_ids, top, tail, logprobs.gather(1, ids[:, 1:].reshape(-1, 1))[:, 0])


def loss(
    model, teacher, kind: str, objective, ids: torch.Tensor, hidden: torch.Tensor | None = None
) -> torch.Tensor:
    """The objective over `ids` (every position after the first is a completion token), divided by
    the tokens of the whole batch, as the trainer divides by the global batch's tokens. `hidden`:
    the student's final hidden states, when its forward ran elsewhere."""
    attention = torch.ones_like(ids)
    if hidden is None:
        hidden = final_hidden_states(model, ids, attention)
    hidden = hidden[:, :-1].reshape(-1, HIDDEN)
    labels = ids[:, 1:].reshape(-1)
    if kind == "online":
        teacher_hidden = final_hidden_states(teacher, ids, attention)[:, :-1].reshape(-1, HIDDEN)
        targets = output_head(teacher, teacher_hidden, VOCAB)
    else:
        targets = stored_targets(teacher, ids) if kind == "stored" else None
    return objective(
        ObjectiveInputs(
            student=output_head(model, hidden, VOCAB),
            labels=labels,
            normaliser=BATCH * (LENGTH - 1),
            sequence=torch.arange(len(ids)).repeat_interleave(LENGTH - 1),
            num_sequences=len(ids),
            teacher=targets,
            chunk_size=5,  # several chunks per process
        )
    )


def run(case: str, rank: int, world: int) -> float:
    name, kind, tied = CASES[case]
    sharded, whole = tiny(0, tied), tiny(0, tied)
    teacher = tiny(1, tied).eval().requires_grad_(False)  # frozen and replicated on every process
    mesh = init_device_mesh("cpu", (world,))
    for layer in sharded.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    ids = torch.randint(0, VOCAB, (BATCH, LENGTH), generator=torch.Generator().manual_seed(2))
    share = BATCH // world
    objective = make_objective(name)
    # FSDP averages gradients over processes; the trainer multiplies by the process count to undo it
    (loss(sharded, teacher, kind, objective, ids[rank * share : (rank + 1) * share]) * world).backward()
    loss(whole, teacher, kind, objective, ids).backward()
    worst = 0.0
    for (_, p), (_, q) in zip(sharded.named_parameters(), whole.named_parameters(), strict=True):
        difference = (p.grad.full_tensor() - q.grad).abs().max() / q.grad.abs().max().clamp_min(1e-12)
        worst = max(worst, float(difference))
    return worst


def run_cases(run_case) -> None:
    """`run_case(case, rank, world)` for every case, its results written to OUT_DIR/rank<R>.json; then
    the process group (already made) is destroyed."""
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {case: run_case(case, rank, world) for case in CASES}
    (Path(sys.argv[1]) / f"rank{rank}.json").write_text(json.dumps(results))
    # Left to interpreter shutdown, gloo's threads sometimes abort the exit ("terminate called without
    # an active exception", SIGABRT), which would fail a run whose results are written.
    dist.barrier()  # no process tears down a connection another is still using
    dist.destroy_process_group()


if __name__ == "__main__":
    dist.init_process_group("gloo")
    run_cases(run)
