"""Write the random-init benchmark model dir (Llama shape by default, the bundled tokenizer) once per run.

    python bench/gpu/make_model.py --out /tmp/model --hidden 2048 --layers 22 --heads 32 --kv-heads 4 \
        --vocab 32000 --dtype bf16          # ~1.1B, TinyLlama's shape

Built on the GPU when there is one (a 1B random init on CPU takes most of a minute), saved as safetensors
under a temporary name and renamed into place when whole (bench_model.py); sft_bench.py / dpo_bench.py then
load it in every framework with --model-dir.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_model as bm


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shape", choices=["llama", "qwen2"], default="llama")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--max-positions", type=int, default=4096, help="8192 for the 8k-token rows")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    bm.write_model(
        args.out,
        args.shape,
        args.vocab,
        args.hidden,
        args.layers,
        args.dtype,
        heads=args.heads,
        kv_heads=args.kv_heads,
        max_positions=args.max_positions,
    )
    params = bm.count_params(args.out)
    print(
        f"model {args.out}: {args.shape}, {params / 1e9:.3f}B parameters, {args.dtype}, "
        f"{time.perf_counter() - started:.0f} s"
    )


if __name__ == "__main__":
    main()
