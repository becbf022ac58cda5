#!/usr/bin/env bash
# One device-tool call (< 8 min on one H100/H200): dstrain vs TRL on a random-init ~1.1B Llama-shaped model
# (TinyLlama shape: hidden 2048, 22 layers, 32/4 GQA heads, vocab 32000), bf16, LoRA r16 all-linear, ZeRO-2,
# seq 2048: tokens/s, MFU at 4N FLOPs/token (LoRA: forward 2N + backward to the activations 2N; frozen
# weights get no weight gradient; attention FLOPs not counted) and peak CUDA memory (max allocated).
# It reuses bench/sft_bench.py and bench/dpo_bench.py with GPU arguments; each part is bounded by `timeout`,
# so one failure cannot eat the budget, and every part's log and JSON land in $OUT.
#
#   device run:  carry [".whl"], timeout_s 560, command: bash bench/gpu/run.sh
#   CPU dry run of the same code paths at toy size:  SMOKE=1 bash bench/gpu/run.sh   (OUT=/tmp/gpu-smoke)
#   a subset:    PARTS="sft dpo" bash bench/gpu/run.sh        (parts: sft qlora dpo step; default sft dpo qlora)
#
# Parts, in this order (each bounded by `timeout`):
#   model  write the random-init 1.1B model dir once (bf16 safetensors, built on the GPU)            <= 90
#   sft    SFT tokens/s, dstrain (group_by_length, chunked supervised-only logits) vs TRL SFTTrainer
#   dpo    DPO pairs/s, dstrain (share_prompt, adapter-disabled reference) vs TRL DPOTrainer
#   qlora  the sft part with the base in 4-bit NF4 (model.load_in_4bit / BitsAndBytesConfig)
#   step   bench/gpu/bench_gpu.py: in-process step cost, labels= loss vs dstrain's SupervisedLM       (opt-in)
# Each launch is killed after LIMIT-10 s, each part after 2 x LIMIT + 20 s, and the whole call stays
# within BUDGET (470 s): a part that would start with under 60 s left is skipped and says so.
#
# The GPU image (KINDS.md) has torch, transformers 5.17, peft, accelerate, pyarrow, tensorboard, but no
# DeepSpeed, TRL, datasets or bitsandbytes: build .whl/ here first with bench/gpu/make_wheels.sh (< 64 MiB;
# bitsandbytes slimmed to its CUDA 13 library). Preflight below prints what is missing and which parts
# cannot run, instead of failing inside a part.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
SMOKE=${SMOKE:-0}
OUT=${OUT:-/tmp/out}
PY=${PYTHON:-python3}
PARTS=${PARTS:-"sft dpo qlora"}
mkdir -p "$OUT"
if [ "$SMOKE" = 1 ]; then
  PY=${PYTHON:-/work/venv/bin/python}
  WORK=${WORK:-/tmp/gpu-smoke-work}
else
  WORK=${WORK:-/tmp/gpu-bench-work}
  if compgen -G ".whl/*.whl" > /dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      || echo "warning: wheel install failed"
    export PYTHONPATH=/tmp/site
  fi
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mkdir -p "$WORK"
started=$SECONDS

echo "== preflight"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee "$OUT/gpu.txt"
$PY - <<'EOF' 2>&1 | grep -v "^\[20" | tee "$OUT/preflight.txt"
import importlib
for name in ("torch", "transformers", "peft", "accelerate", "deepspeed", "trl", "datasets", "bitsandbytes",
             "tensorboard", "pyarrow", "typer", "rich", "psutil", "yaml", "matplotlib"):
    try:
        module = importlib.import_module(name)
        print(f"ok      {name} {getattr(module, '__version__', '')}")
    except Exception as exc:  # a broken install reads the same as a missing one: that part cannot run
        print(f"MISSING {name}: {type(exc).__name__}: {str(exc)[:120]}")
try:
    import dstrain.train, dstrain.training.loop  # noqa: F401,E401
    print("ok      dstrain")
except Exception as exc:
    print(f"MISSING dstrain: {type(exc).__name__}: {exc}")
import torch
print("cuda", torch.cuda.is_available(), torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
EOF
missing() { grep -q "^MISSING $1" "$OUT/preflight.txt"; }
if missing deepspeed || missing dstrain; then echo "cannot run: DeepSpeed or dstrain does not import"; exit 1; fi
TRL_ROWS="trl"
if missing trl || missing datasets; then echo "note: no TRL/datasets: dstrain rows only"; TRL_ROWS=""; fi

if [ "$SMOKE" = 1 ]; then
  # toy size, same code paths: 2 layers, hidden 64, seq 256, fp32 on CPU
  SHAPE=(--hidden 64 --layers 2 --heads 2 --kv-heads 1 --vocab 3000 --dtype fp32)
  SFT_DATA=(--records-kind short --max-seq-len 512 --max-passage-tokens 384)
  DPO_DATA=(--passage-words 40 70 --max-seq-len 512 --max-passage-tokens 384)
  STEPS=(--steps 6 --warmup 2)
  DT=fp32; NPROC=1; LIMIT=240
else
  SHAPE=(--hidden 2048 --layers 22 --heads 32 --kv-heads 4 --vocab 32000 --dtype bf16)
  SFT_DATA=(--records-kind long --max-seq-len 2048 --max-passage-tokens 1600)  # rows ~1,800 tokens
  DPO_DATA=(--passage-words 150 300 --max-seq-len 2048 --max-passage-tokens 1800)  # shared prompt ~1,830
  STEPS=(--steps 24 --warmup 6)
  DT=bf16; NPROC=1; LIMIT=150
fi
MODEL=$WORK/model
echo "== model: ${SHAPE[*]} ($((SECONDS - started)) s)"
timeout 90 $PY bench/gpu/make_model.py --out "$MODEL" "${SHAPE[@]}" 2>&1 | grep -vE "^\[20|Writing model" | tee "$OUT/model.txt"
[ -f "$MODEL/config.json" ] || { echo "model build failed"; exit 1; }

# common arguments of every part: the GPU run is one rank (deepspeed --num_gpus 1), torch AdamW (no JIT build)
COMMON=(--model-dir "$MODEL" --nproc "$NPROC" --dtype "$DT" --torch-adam "${STEPS[@]}" --timeout $((LIMIT - 10)))
BUDGET=${BUDGET:-470}  # seconds for the whole call: a part gets at most what is left of it
part() {  # name, seconds, command...: one bounded part, its output kept whole in $OUT/NAME.log
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET - (SECONDS - started)))
  if [ "$left" -lt 60 ]; then echo "== $name skipped: ${left} s of the budget left"; return; fi
  [ "$limit" -le "$left" ] || limit=$left
  echo "== $name ($((SECONDS - started)) s elapsed, limit ${limit} s)"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local code=$?
  grep -vE "^\[20|Warning|warn|it/s\]|examples/s\]" "$OUT/$name.log" | grep -E "^\||^\[|ratios|^==|error|Error|FAILED|^data|MFU" | tail -30
  [ $code -eq 0 ] || echo "   $name exited $code (124: timed out)"
}
for p in $PARTS; do
  case $p in
    sft) part sft $((LIMIT * 2 + 20)) $PY bench/sft_bench.py "${COMMON[@]}" "${SFT_DATA[@]}" --records 160 \
           --variants dstrain $TRL_ROWS --work-dir "$WORK/sft" --out "$OUT/sft.json" ;;
    qlora)
      if missing bitsandbytes; then echo "== qlora skipped: bitsandbytes missing"; continue; fi
      part qlora $((LIMIT * 2 + 20)) $PY bench/sft_bench.py "${COMMON[@]}" "${SFT_DATA[@]}" --records 160 \
        --load-in-4bit --variants dstrain $TRL_ROWS --work-dir "$WORK/qlora" --out "$OUT/qlora.json" ;;
    dpo) part dpo $((LIMIT * 2 + 20)) $PY bench/dpo_bench.py "${COMMON[@]}" "${DPO_DATA[@]}" --pairs 120 --micro 2 \
           --variants dstrain $TRL_ROWS --work-dir "$WORK/dpo" --out "$OUT/dpo.json" ;;
    step) part step 200 $PY bench/gpu/bench_gpu.py --out "$OUT" ;;
    *) echo "unknown part $p (sft qlora dpo step)" ;;
  esac
done
echo "== done in $((SECONDS - started)) s; results: $OUT/{sft,qlora,dpo}.json, logs: $OUT/*.log"
