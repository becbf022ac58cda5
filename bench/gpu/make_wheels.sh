#!/usr/bin/env bash
# Build the wheels bench/gpu/run.sh installs, here (where pip reaches the registry), before the device call.
# The GPU image (KINDS.md: Python 3.12, torch 2.11, transformers 5.17, peft (version unknown), accelerate
# 1.15, pyarrow, tensorboard, pandas, xxhash, huggingface-hub 1.33, triton 3.6) lacks DeepSpeed, TRL,
# datasets, bitsandbytes and Liger. Everything carried must stay under the device tool's 64 MiB per call (the
# working tree counts too), so:
#   - DeepSpeed is a pure-Python wheel built from its sdist (ops JIT-build on demand; run.sh uses torch's
#     AdamW so none is built);
#   - bitsandbytes' manylinux wheel holds one library per CUDA/ROCm version (~125 MB unpacked): it is
#     repacked with only the CUDA 13 library the image needs (cu13 torch) and the CPU one;
#   - transformers, peft and TRL are the versions dstrain's tests run on (transformers 5.24, peft 0.21.2, TRL
#     1.16): the image's peft is of unknown version, and transformers 5.24 names peft >= 0.22 only for its own
#     adapter methods (load_adapter), which no benchmark calls; get_peft_model is what they use;
#   - liger-kernel (pure Python; the image's triton runs it) for HF Trainer's use_liger_kernel=True.
# The folder is emptied first: two wheels of one package stop the whole install.
#
# Usage: bash bench/gpu/make_wheels.sh                    (then the device call: carry [".whl"])
#        PYVER=3.11 WHEELS=.whl-cpu bash bench/gpu/make_wheels.sh   (for the CPU dry run on this machine)
set -euo pipefail
cd "$(dirname "$0")/../.."
WHEELS=${WHEELS:-.whl}
PYVER=${PYVER:-3.12}
# keep the wheels out of git: info/exclude of this checkout (a worktree's .git is a file: ask git for the path)
exclude=$(git rev-parse --git-path info/exclude 2>/dev/null || true)
if [ -n "$exclude" ]; then
  mkdir -p "$(dirname "$exclude")"
  grep -qx "/$WHEELS/" "$exclude" 2>/dev/null || echo "/$WHEELS/" >> "$exclude"
fi
rm -rf "$WHEELS"
mkdir -p "$WHEELS"
PIP=(python3 -m pip download --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp
     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any -d "$WHEELS")
python3 -m pip wheel -q --no-deps deepspeed==0.19.8 -w "$WHEELS"
"${PIP[@]}" -q trl==1.16.0 datasets==5.2.0 "dill>=0.3,<0.4.2" "multiprocess<0.70.20" transformers==5.24.0 \
  peft==0.21.2 liger-kernel==0.8.5 hjson pydantic annotated-types typing-inspection "typing-extensions>=4.16" \
  bitsandbytes==0.50.2
# pydantic-core must be the exact version this pydantic pins
core=$(unzip -p "$WHEELS"/pydantic-[0-9]*.whl '*/METADATA' | sed -n 's/^Requires-Dist: pydantic-core==\([0-9.]*\).*/\1/p')
"${PIP[@]}" -q "pydantic-core==$core"
# slim bitsandbytes: keep the CUDA 13 and CPU libraries only
bnb=$(ls "$WHEELS"/bitsandbytes-*.whl)
tmp=$(mktemp -d)
(cd "$tmp" && unzip -q "$OLDPWD/$bnb" && find . -name 'libbitsandbytes_*' ! -name '*cuda130*' ! -name '*cpu*' -delete \
  && rm "$OLDPWD/$bnb" && zip -qr "$OLDPWD/$bnb" .)
rm -rf "$tmp"
# one wheel per package, and under the carry limit with room for the working tree
dupes=$(ls "$WHEELS" | sed 's/-[0-9].*//' | tr 'A-Z-' 'a-z_' | sort | uniq -d)
[ -z "$dupes" ] || { echo "two wheels of: $dupes" >&2; exit 1; }
size=$(du -sm "$WHEELS" | cut -f1)
ls -la "$WHEELS"
echo "$WHEELS: $(ls "$WHEELS" | wc -l) wheels, $size MiB"
[ "$size" -le 56 ] || { echo "over 56 MiB: the device call carries at most 64 MiB with the working tree" >&2; exit 1; }
