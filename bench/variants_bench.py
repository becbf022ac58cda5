"""Adapter variants' step cost: DoRA (and rsLoRA, PiSSA, LoRA+) against plain LoRA, in one process.

    python bench/variants_bench.py                 # hidden 512, 4 layers, micro 4 x seq 512
    python bench/variants_bench.py --steps 20 --dropout 0.05

Every variant is built on the same random-init Llama-shaped model dir (fp32, LoRA r16 on all linear
layers) and steps through dstrain's own SupervisedLM (chunked head; the loss on the last 15% of each row,
a RAG answer after its passages) plus a torch AdamW step (LoRA+'s second group included). The variants
take their steps in turn, one step each per round, so a change of load on a shared machine hits them all
alike; the median step over the rounds (after one warm-up round) is compared with LoRA's, as a ratio, in
the process's CPU time (with OMP_NUM_THREADS=1 the work done, which other jobs on a shared machine barely
change) and in wall time.
rsLoRA changes a scale and PiSSA/OLoRA only the initial values: they are in the table as controls for the
noise of the measurement (their ratio should be 1.00). PiSSA's one-time initialisation (the SVD of every
adapted weight) is timed at the build.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench_model import write_model  # noqa: E402  (bench/ is the script's dir)
from memory_bench import machine  # noqa: E402

VARIANTS: dict[str, dict] = {
    "lora": {},
    "dora": {"use_dora": True},
    "rslora": {"use_rslora": True},
    "pissa": {"init_lora_weights": "pissa"},
    "lora+ (ratio 16)": {"loraplus_lr_ratio": 16.0},
}


def build(model: Path, lora: dict, dropout: float) -> tuple[object, object, float]:
    """(SupervisedLM, AdamW over its groups, seconds the build took)."""
    import torch

    from dstrain.config.run import LoraConfig, ModelConfig
    from dstrain.model import variants
    from dstrain.model.build import build_model
    from dstrain.model.supervised import SupervisedLM

    torch.manual_seed(0)
    started = time.perf_counter()
    peft_model = build_model(
        ModelConfig(path=str(model)), LoraConfig(r=16, alpha=32, dropout=dropout, **lora), 2
    )
    seconds = time.perf_counter() - started
    lm = SupervisedLM(peft_model, 1024).train()
    groups = variants.optimizer_groups(lm.named_parameters(), 2e-4, lora.get("loraplus_lr_ratio"))
    return lm, torch.optim.AdamW(groups, lr=2e-4, foreach=True), seconds


def batch(micro: int, seq: int, vocab: int) -> tuple:
    import torch

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(4, vocab, (micro, seq), generator=gen)
    labels = torch.full_like(ids, -100)
    start = seq - int(seq * 0.15)
    labels[:, start:] = ids[:, start:]
    return ids, torch.ones_like(ids), labels


def step(lm: object, optimizer: object, inputs: tuple) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one forward + backward + optimizer step."""
    wall, cpu = time.perf_counter(), time.process_time()
    total, count = lm(*inputs)
    (total / count).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--micro", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=3000)
    parser.add_argument("--dropout", type=float, default=0.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="variants-bench-") as tmp:
        model = write_model(
            Path(tmp) / "m", layers=args.layers, shape="llama", vocab=args.vocab, hidden=args.hidden
        )
        built = {name: build(model, lora, args.dropout) for name, lora in VARIANTS.items()}
        inputs = batch(args.micro, args.seq, args.vocab)
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in VARIANTS}
        for round_ in range(args.steps + 1):  # round 0 warms up
            for name, (lm, optimizer, _) in built.items():
                seconds = step(lm, optimizer, inputs)
                if round_:
                    times[name].append(seconds)
    wall = {name: statistics.median(t[0] for t in values) for name, values in times.items()}
    cpu = {name: statistics.median(t[1] for t in values) for name, values in times.items()}
    print(
        f"## Adapter variants: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, micro {args.micro} x "
        f"seq {args.seq}, LoRA r16 all-linear, dropout {args.dropout}, fp32, {args.steps} rounds\n{machine()}\n"
    )
    print("| variant | median step CPU | vs lora | median step wall | vs lora | build (init) |")
    print("|---|---|---|---|---|---|")
    for name in VARIANTS:
        print(
            f"| {name} | {cpu[name] * 1000:,.0f} ms | {cpu[name] / cpu['lora']:.2f}x | {wall[name] * 1000:,.0f} ms "
            f"| {wall[name] / wall['lora']:.2f}x | {built[name][2]:.2f} s |"
        )


if __name__ == "__main__":
    main()
