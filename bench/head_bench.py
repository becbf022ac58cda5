"""Log-prob paths at large vocabularies: the chunked head vs the exact path (the model's own forward at the
supervised columns) vs transformers' `labels=` loss (full logits), and the first-batch self-check's cost.

    python bench/head_bench.py                      # vocab 32,000 and 151,936
    python bench/head_bench.py --vocab 32000 --steps 2

Each variant runs in a fresh process on the same random-init Llama-shaped model (hidden 512, 2 layers,
8 heads / 2 KV, untied head, fp32, LoRA r16 on all linear layers): micro 2 x seq 1024, the last 15% of each
row supervised (a RAG answer after its passages). One warm-up step, then `--steps` timed forward+backward
steps; tokens/s counts every input token. Peak memory: growth of the process's VmHWM over the steps (CPU
RSS). `selfcheck` is one SupervisedLM(check=True) call on the same batch, timed against one training step.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench_model import write_model  # noqa: E402  (bench/ is the script's dir)
from memory_bench import machine  # noqa: E402

VARIANTS = ("chunked", "exact", "hf-full")
MiB = 1024**2


def batch(args: argparse.Namespace, vocab: int) -> tuple:
    import torch

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(4, vocab, (args.micro, args.seq), generator=gen)
    labels = torch.full_like(ids, -100)
    start = args.seq - int(args.seq * 0.15)
    labels[:, start:] = ids[:, start:]
    return ids, torch.ones_like(ids), labels


def step(variant: str, lm: object, peft_model: object, inputs: tuple) -> None:
    ids, mask, labels = inputs
    if variant == "hf-full":
        loss = peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss
    else:
        total, count = lm(ids, mask, labels)
        loss = total / count
    loss.backward()


def variant_main(args: argparse.Namespace) -> None:
    import torch

    from dstrain.config.run import LoraConfig, ModelConfig
    from dstrain.model import memory
    from dstrain.model.build import build_model
    from dstrain.model.supervised import SupervisedLM

    torch.manual_seed(0)
    peft_model = build_model(ModelConfig(path=args.model), LoraConfig(r=16, alpha=32, dropout=0.0), 2)
    vocab = peft_model.get_base_model().config.vocab_size
    head = "exact" if args.variant == "exact" else "chunked"
    lm = SupervisedLM(peft_model, 1024, head=head)
    inputs = batch(args, vocab)
    before = memory.rss_bytes()
    memory.reset_peak_rss()
    step(args.variant, lm, peft_model, inputs)  # warm-up, inside the peak: the first step allocates too
    started = time.perf_counter()
    for _ in range(args.steps):
        step(args.variant, lm, peft_model, inputs)
    seconds = (time.perf_counter() - started) / args.steps
    growth = memory.rss_bytes("VmHWM") - before
    result = {"tokens_per_s": args.micro * args.seq / seconds, "step_s": seconds, "rss_growth": growth}
    if args.variant == "chunked":
        started = time.perf_counter()
        with torch.no_grad():
            lm.eval()(*inputs, check=True)
        result["selfcheck_s"] = time.perf_counter() - started
    print("RESULT " + json.dumps(result), flush=True)


def run_variant(model: Path, variant: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--one", variant, "--model", str(model), "--steps", str(args.steps)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{variant} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--vocab", type=int, nargs="*", default=[32000, 151936])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--micro", type=int, default=2)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--one", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        args.variant = args.one
        return variant_main(args)
    print(f"## Log-prob paths: micro {args.micro} x seq {args.seq}, 15% supervised, fp32\n{machine()}\n")
    print("| vocab | variant | tokens/s | vs chunked | peak RSS growth | vs chunked | self-check / step |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="head-bench-") as tmp:
        for vocab in args.vocab:
            model = write_model(Path(tmp) / f"v{vocab}", layers=2, shape="llama", vocab=vocab, hidden=512)
            rows = {variant: run_variant(model, variant, args) for variant in VARIANTS}
            base = rows["chunked"]
            for variant, r in rows.items():
                check = f"{r['selfcheck_s'] / r['step_s']:.2f}" if "selfcheck_s" in r else ""
                print(
                    f"| {vocab:,} | {variant} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / base['tokens_per_s']:.2f}x "
                    f"| {r['rss_growth'] / MiB:,.0f} MiB | {r['rss_growth'] / base['rss_growth']:.2f}x | {check} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
