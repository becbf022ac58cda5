#!/usr/bin/env bash
# One device-tool call (< 8 min): install carried wheels if missing, smoke-test `dstrain train` on the GPU
# (nccl, bf16, ZeRO-2), then time dstrain's step against the transformers labels= step on a ~1.1B model.
#   device run: carry [".whl"], command: bash bench/gpu/run.sh
# The GPU image has torch/transformers/peft but no DeepSpeed; build the wheels it needs here first:
#   echo /.whl/ >> .git/info/exclude; pip wheel --no-deps deepspeed==0.19.8 -w .whl
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 -d .whl \
#     hjson pydantic pydantic-core annotated-types typing-inspection "typing-extensions>=4.16"
#   (pydantic-core must be the exact version pydantic pins)
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if ! python3 -c "import deepspeed" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, peft, deepspeed; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'deepspeed', deepspeed.__version__)" | tee -a "$OUT/gpu.txt"
echo "== smoke: dstrain demo on GPU, bf16"
(cd /tmp && timeout 240 python3 -m dstrain.train --ds-config "$OLDPWD/bench/gpu/demo_ds_torch_adam.json" \
  --set model.dtype=bf16 --set train.max_steps=40 --set output_dir=/tmp/gpu-demo 2>&1 | tail -8)
cp /tmp/gpu-demo/metrics.jsonl "$OUT/gpu_demo_metrics.jsonl" 2>/dev/null
echo "== bench: 1.1B Llama-shaped, seq 2048, micro 4, LoRA r16 all-linear, ZeRO-2 bf16"
timeout 400 python3 bench/gpu/bench_gpu.py --out "$OUT" 2>&1 | grep -vE "^\[20|Warning|warn" | tail -60
