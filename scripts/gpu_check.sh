#!/usr/bin/env bash
# Issue 21's GPU checks: 1 process against N with the same global batch, on GPUs, for plain data
# parallel (DDP), FSDP2 (accelerate's plugin, which it enables on GPUs only) and LoRA, with SFT,
# forward KL from an online teacher (with gradient accumulation) and TAID. Models are built from a
# config (no download); a few minutes on 2 GPUs. Needs at least 2 GPUs (NCCL refuses two processes
# on one GPU); on fewer it says so and stops.
#
#     scripts/gpu_check.sh [OUT_DIR]      # default: gpu-check/
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${1:-gpu-check}
GPUS=$($PY -c "import torch; print(torch.cuda.device_count())")
if [ "$GPUS" -lt 2 ]; then
    echo "gpu_check: $GPUS GPU(s) here; the 1-vs-N checks need 2 (NCCL runs one process per GPU)" >&2
    exit 3
fi
rm -rf "$OUT" && mkdir -p "$OUT/one" "$OUT/two"
export DISTRIBUTED_RUN_DEVICE=cuda OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
# name:objective:per-device batch:accumulation; the same global batch of 4 on 1 and on 2 processes
ONE=(sft:sft:4:1 kd:forward_kl:4:1 taid:taid:4:1 lora:sft:4:1 fsdp:sft:4:1 fsdp-kd:forward_kl:4:1)
TWO=(sft:sft:2:1 kd:forward_kl:1:2 taid:taid:2:1 lora:sft:2:1 fsdp:sft:2:1 fsdp-kd:forward_kl:2:1)
CUDA_VISIBLE_DEVICES=0 $PY tests/distributed_run.py "$OUT/one" "${ONE[@]}"
CUDA_VISIBLE_DEVICES=0,1 $PY -m accelerate.commands.accelerate_cli launch --multi_gpu --num_processes=2 \
    --num_machines=1 --mixed_precision=no --dynamo_backend=no --main_process_port=0 \
    tests/distributed_run.py "$OUT/two" "${TWO[@]}" 2>&1 | tee "$OUT/launch.log"
$PY - "$OUT" <<'PYTHON'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
one = json.loads((out / "one" / "rank0.json").read_text())
failed = False
for rank in (0, 1):
    two = json.loads((out / "two" / f"rank{rank}.json").read_text())
    for name, reference in one.items():
        run = two[name]
        worst = {}
        for field in ("loss", "grad_norm", "parameters"):
            pairs = list(zip(run[field], reference[field], strict=True))
            scale = max(abs(b) for _, b in pairs) if field == "parameters" else None  # of the largest weight
            worst[field] = max(abs(a - b) / (scale or max(abs(b), 1e-12)) for a, b in pairs)
        ok = run["world_size"] == 2 and run["steps"] == reference["steps"] and max(worst.values()) < 1e-4
        failed |= not ok
        print(f"rank {rank} {name:8s} {'ok  ' if ok else 'FAIL'} " + " ".join(f"{k} {v:.1e}" for k, v in worst.items()))
sys.exit(1 if failed else 0)
PYTHON
