#!/usr/bin/env bash
# Build .whl/ for bench/gpu/run.sh, here (where pip reaches the registry), before the device call.
# The GPU image (KINDS.md: Python 3.12, torch 2.11, transformers 5.17, peft, accelerate 1.15, pyarrow,
# tensorboard, pandas, xxhash, huggingface-hub 1.33) lacks DeepSpeed, TRL, datasets and bitsandbytes.
# Everything carried must stay under the device tool's 64 MiB per call (the working tree counts too), so:
#   - DeepSpeed is a pure-Python wheel built from its sdist (ops JIT-build on demand; run.sh uses torch's
#     AdamW so none is built);
#   - bitsandbytes' manylinux wheel holds one library per CUDA/ROCm version (~125 MB unpacked): it is
#     repacked with only the CUDA 13 library the image needs (cu13 torch) and the CPU one;
#   - transformers is pinned to the version dstrain was developed with (5.24), since TRL 1.16 and
#     dstrain's tests ran on it; peft/accelerate of the image are used as they are.
# Usage: bash bench/gpu/make_wheels.sh      (then device run: carry [".whl"], bash bench/gpu/run.sh)
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
mkdir -p .whl
PIP=(python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl)
python3 -m pip wheel --no-deps deepspeed==0.19.8 -w .whl
"${PIP[@]}" trl==1.16.0 datasets==5.2.0 "dill>=0.3,<0.4.2" "multiprocess<0.70.20" transformers==5.24.0 \
  hjson pydantic annotated-types typing-inspection "typing-extensions>=4.16" bitsandbytes==0.50.2
# pydantic-core must be the exact version this pydantic pins
core=$(unzip -p .whl/pydantic-[0-9]*.whl '*/METADATA' | sed -n 's/^Requires-Dist: pydantic-core==\([0-9.]*\).*/\1/p')
"${PIP[@]}" "pydantic-core==$core"
# slim bitsandbytes: keep the CUDA 13 and CPU libraries only
bnb=$(ls .whl/bitsandbytes-*.whl)
tmp=$(mktemp -d)
(cd "$tmp" && unzip -q "$OLDPWD/$bnb" && find . -name 'libbitsandbytes_*' ! -name '*cuda130*' ! -name '*cpu*' -delete \
  && rm "$OLDPWD/$bnb" && zip -qr "$OLDPWD/$bnb" .)
rm -rf "$tmp"
du -sh .whl; ls -la .whl
