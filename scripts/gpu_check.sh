#!/usr/bin/env bash
# Issue 21's and 22's GPU checks. Models are built from a config (no download); a few minutes in all.
#  0. (1 GPU) the hf backend's decoding loop on CUDA: tests/test_hf_backend.py (its generators pick the
#     GPU: greedy equal to model.generate, seeded rows independent of their batch, the KV buffer, the
#     compiled steps) and benchmarks/hf_decode.py (tokens/s against model.generate, compile included).
#  1. (1 GPU, bitsandbytes installed) QLoRA: a student loaded in 4 bits trains its adapters only.
#  2. (2 GPUs) 1 process against 2 with the same global batch, for plain data parallel (DDP), FSDP2
#     (accelerate's plugin, which it enables on GPUs only) and LoRA, with SFT, forward KL from an
#     online teacher (with gradient accumulation) and TAID: losses, gradient norms and weights equal.
#     NCCL refuses two processes on one GPU, so with one GPU this part is skipped, and said so.
#
#     scripts/gpu_check.sh [OUT_DIR]      # default: gpu-check/
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${1:-gpu-check}
GPUS=$($PY -c "import torch; print(torch.cuda.device_count())")
if [ "$GPUS" -lt 1 ]; then
    echo "gpu_check: no GPU here" >&2
    exit 3
fi
rm -rf "$OUT" && mkdir -p "$OUT/one" "$OUT/two"
CUDA_VISIBLE_DEVICES=0 $PY -m pytest -q -p no:cacheprovider tests/test_hf_backend.py 2>&1 | tail -3 | tee "$OUT/hf_backend.txt" \
    || echo "gpu_check: hf backend tests FAILED (above)"
CUDA_VISIBLE_DEVICES=0 $PY benchmarks/hf_decode.py --device cuda --repeats 3 2>&1 | grep -v Warning | tee "$OUT/hf_decode.txt" \
    || echo "gpu_check: benchmarks/hf_decode.py FAILED (above)"
if $PY -c "import bitsandbytes" 2>/dev/null; then
    CUDA_VISIBLE_DEVICES=0 $PY - "$OUT" <<'PYTHON'
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

from reasondistill.records import TrainingExample
from reasondistill.train.hyperparameters import Hyperparameters
from reasondistill.train.lora import LoraOptions
from reasondistill.train.trainer import train_model

out = Path(sys.argv[1]) / "qlora"
tokenizer = AutoTokenizer.from_pretrained("src/reasondistill/testbed/weights/teacher")
torch.manual_seed(0)
config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=4)
Qwen2ForCausalLM(config).save_pretrained(out / "init")
tokenizer.save_pretrained(out / "init")
examples = [TrainingExample(problem_id=f"p{i}", task="t", messages=[{"role": "user", "content": f"{i} + {i}?"}],
                            completion=f"{i} + {i} = {2 * i}. The answer is {2 * i}.") for i in range(16)]
stats = train_model(out / "init", examples, out / "adapter", Hyperparameters(epochs=2, batch_size=4, learning_rate=1e-3,
                    precision="bf16"), lora=LoraOptions(r=8, quantize="4bit"))
adapter = load_file(out / "adapter" / "adapter_model.safetensors")
ok = stats["loss_curve"][-1][1] < stats["loss_curve"][0][1] and all(torch.isfinite(t).all() for t in adapter.values())
print(f"qlora {'ok  ' if ok else 'FAIL'} loss {stats['loss_curve'][0][1]:.3f} -> {stats['loss_curve'][-1][1]:.3f}, "
      f"{stats['lora']['trainable_parameters']} trainable parameters")
sys.exit(0 if ok else 1)
PYTHON
else
    echo "gpu_check: bitsandbytes is not installed: QLoRA not checked"
fi
if [ "$GPUS" -lt 2 ]; then
    echo "gpu_check: $GPUS GPU here; the 1-vs-2-process checks need 2 (NCCL runs one process per GPU)"
    exit 0
fi
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
