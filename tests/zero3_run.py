"""The distillation loss on a student partitioned by DeepSpeed ZeRO-3, for test_distributed.py.

Run as `torchrun --standalone --nproc-per-node 2 zero3_run.py OUT_DIR` with DS_ACCELERATOR=cpu (CPU
processes, gloo). The loss path is the trainer's under ZeRO-3: the final hidden states from the
engine's forward, then the objective run as the output head module's forward (`inside_forward`), where
ZeRO-3 holds the head whole. Each process takes half of a batch; after one SGD step of learning rate 1
(DeepSpeed averages gradients over processes, so the loss is multiplied by their number, as the
trainer does) the gathered weights must equal those of the unsharded model stepped on the whole
batch. Every rank writes `OUT_DIR/rank<R>.json`: per case, the largest weight difference.
"""

import deepspeed
import torch
from fsdp2_run import BATCH, CASES, LENGTH, loss, run_cases, tiny

from reasondistill.objectives import make_objective
from reasondistill.train.teachers import final_hidden_states, inside_forward, partitioned


def run(case: str, rank: int, world: int) -> float:
    name, kind, tied = CASES[case]
    whole, student = tiny(0, tied), tiny(0, tied)
    teacher = tiny(1, tied).eval().requires_grad_(False)  # frozen and replicated on every process
    config = {
        "train_micro_batch_size_per_gpu": BATCH // world,
        "zero_optimization": {"stage": 3},
        "optimizer": {"type": "SGD", "params": {"lr": 1.0}},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 0.0,  # (DeepSpeed's default clips at 1.0)
    }
    engine, *_ = deepspeed.initialize(model=student, config=config, model_parameters=student.parameters())
    head = engine.module.get_output_embeddings()
    assert partitioned(head.weight) and head.weight.numel() == 0  # outside a forward: in pieces
    ids = torch.randint(0, 64, (BATCH, LENGTH), generator=torch.Generator().manual_seed(2))
    share = ids[rank * (BATCH // world) : (rank + 1) * (BATCH // world)]
    hidden = final_hidden_states(engine, share, torch.ones_like(share))  # ZeRO-3 gathers each layer
    objective = make_objective(name)
    objective_loss = inside_forward(
        head, lambda: loss(engine.module, teacher, kind, objective, share, hidden)
    )
    engine.backward(objective_loss * world)
    engine.step()
    loss(whole, teacher, kind, objective, ids).backward()
    worst = 0.0
    with torch.no_grad(), deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        for p, q in zip(engine.module.parameters(), whole.parameters(), strict=True):
            worst = max(worst, float((p - (q - q.grad)).abs().max()))  # q after its SGD step
    return worst


def main() -> None:
    # DeepSpeed's CPU accelerator would compile its shared-memory all-reduce (30 s, once per cache);
    # gloo's collectives give the same sums
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo")
    run_cases(run)


if __name__ == "__main__":
    main()
