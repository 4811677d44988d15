#!/usr/bin/env bash
# GPU checks and benchmarks in one run on the device machine (its image has torch, transformers, peft).
# Writes results under $OUT; locally: OUT=/tmp/out bash benchmarks/device_check.sh
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/device-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
date -u
# CUDA tests: NF4 on the GPU (and against bitsandbytes when present), LoRA/QLoRA training in bf16.
python3 -m pytest -q -p no:cacheprovider -rs tests/test_quantize.py tests/test_finetune.py -k "cuda" 2>&1 | tail -15
# The 7B shape as the issue measured HF: LoRA r16 on all linears, gradient checkpointing, batch 4 x 2048.
timeout 400 python3 benchmarks/finetune.py --preset 7B --seq-len 2048 --batch-size 4 --gradient-checkpointing \
  --steps 5 --warmup 2 --sides hf,llamaforge-compiled,llamaforge,llamaforge-qlora-compiled --json > "$OUT/finetune_7b.json"
cat "$OUT/finetune_7b.json"
# LoRA DPO against trl's DPOTrainer + peft on a 1.1B shape (the image lacks trl: carry its wheel, see
# ../.library/device/README.md, and `pip install --no-deps` it first; skipped without it).
if python3 -c "import trl" 2>/dev/null; then
  timeout 300 python3 benchmarks/dpo.py --layers 22 --dim 2048 --batch-size 8 --prompt-words 200 --pairs 64 \
    --steps 5 --warmup 2 --json > "$OUT/dpo_1b.json"
  cat "$OUT/dpo_1b.json"
fi
