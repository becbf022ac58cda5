#!/usr/bin/env bash
# One device-tool call: dstrain vs HF Trainer, HF Trainer + Liger and TRL on a random-init ~1.1B Llama-shaped
# model (TinyLlama shape: hidden 2048, 22 layers, 32/4 GQA heads, vocab 32000), bf16, LoRA r16 all-linear,
# ZeRO-2, one GPU: SFT at seq 2048 and 8k, DPO, QLoRA. tokens/s, pairs/s, MFU at 4N FLOPs/token, peak CUDA
# memory. Parts and deadlines: bench/gpu/gpu_run.py and gpu_plan.py.
#
#   here, first:  bash bench/gpu/make_wheels.sh          (fills .whl/, ~50 MiB, needs the package registry)
#   device tool:  run  carry [".whl"]  timeout_s 600  command "bash bench/gpu/run.sh"
#   CPU dry run of the same path at toy width (~6 min on 2 cores; wheels for this machine's Python):
#                 PYVER=3.11 WHEELS=.whl-cpu bash bench/gpu/make_wheels.sh
#                 SMOKE=1 WHEELS=.whl-cpu OUT=/tmp/gpu-smoke bash bench/gpu/run.sh
#   a subset:     PARTS="sft dpo" bash bench/gpu/run.sh   (parts: sft long dpo qlora step)
#
# What comes back ($OUT, at most 6 files, flat): setup.txt (install, preflight, model, the summary table),
# sft.json long.json dpo.json qlora.json (rewritten after every row: a part cut at its deadline keeps its
# finished rows) and logs.tar.gz (every launch log). The whole call stays within BUDGET seconds (GPU 540,
# counted from here, install included); each part is cut at its deadline with its whole process tree killed.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
export BENCH_STARTED=$(date +%s)
SMOKE=${SMOKE:-0}
OUT=${OUT:-/tmp/out}
WHEELS=${WHEELS:-.whl}
if [ "$SMOKE" = 1 ]; then
  [ -x .venv/bin/python ] && DEFAULT_PY=.venv/bin/python || DEFAULT_PY=python3  # the README's venv
  WORK=${WORK:-/tmp/gpu-smoke-work}
  BUDGET=${BUDGET:-480}
else
  DEFAULT_PY=python3  # the GPU image's Python, the one that holds PyTorch
  WORK=${WORK:-/tmp/gpu-bench-work}
  BUDGET=${BUDGET:-540}
fi
PY=${PYTHON:-$DEFAULT_PY}
export SMOKE OUT WORK BUDGET
mkdir -p "$OUT" "$WORK"
# a fresh start: keep only a finished model dir (its stamp says it is whole) of an earlier run on this machine
find "$WORK" -mindepth 1 -maxdepth 1 ! -name model -exec rm -rf {} +
mkdir -p "$WORK/logs"
note() { echo "$1" | tee -a "$OUT/setup.txt"; }
: > "$OUT/setup.txt"

# 1. the carried wheels, into a fresh target dir, bounded: a hung install must not spend the call
SITE=$WORK/site
if compgen -G "$WHEELS/*.whl" > /dev/null; then
  count=$(ls "$WHEELS"/*.whl | wc -l)
  timeout -k 5 150 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "$WHEELS"/*.whl > "$WORK/logs/install.log" 2>&1
  code=$?
  if [ $code -eq 0 ]; then note "== install: $count wheels from $WHEELS ($(( $(date +%s) - BENCH_STARTED )) s)"
  else note "== install: FAILED (exit $code; 124: timed out), see logs/install.log in logs.tar.gz; image packages only"
  fi
  export PYTHONPATH=$SITE
else
  note "== install: no wheels in $WHEELS (build them with bench/gpu/make_wheels.sh): image packages only"
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
  | sed 's/^/== nvidia-smi: /' | tee -a "$OUT/setup.txt"

# 2. preflight, model and parts, each under its own deadline (gpu_run.py); this timeout is the last backstop
left=$(( BUDGET - ($(date +%s) - BENCH_STARTED) ))
timeout -k 10 $(( left > 30 ? left : 30 )) "$PY" bench/gpu/gpu_run.py
code=$?
if [ $code -ne 0 ]; then
  echo "gpu_run.py exited $code (124: cut by the whole call's budget)" | tee -a "$OUT/setup.txt"
fi
if [ ! -f "$OUT/logs.tar.gz" ] || [ $code -ge 124 ]; then
  # the tarball of whatever logs exist, should gpu_run.py have died before packing them
  (cd "$WORK" && find . -path ./model -prune -o -path ./site -prune -o -name '*.log' -print \
    | tar czf "$OUT/logs.tar.gz" -T - 2>/dev/null)
  rm -f "$OUT"/*.partial
fi
echo "== OUT: $(ls "$OUT" | wc -l) files: $(ls "$OUT" | tr '\n' ' ')"
exit $code
