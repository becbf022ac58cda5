"""Step benchmark: dstrain's LoRA step vs the transformers `labels=` step, same engine, same batches.

On a GPU (bench/gpu/run.sh, device tool) it uses the defaults below; on CPU pass a small shape, e.g.
`python bench/gpu/bench_gpu.py --layers 4 --hidden 256 --vocab 32000 --seq 512 --micro 4 --steps 6`.
`--heads` sets the attention heads (default 32/4 GQA; the toy shapes of the CPU dry run need fewer).

A random-init ~1.1B Llama-shaped model (TinyLlama shape: hidden 2048, 22 layers, GQA 32/4 heads, vocab
32000) in bf16 with LoRA r=16 on all linear layers, inside a DeepSpeed ZeRO-2 engine on one GPU. Batches are
RAG-shaped: seq 2048, loss on the last 15% of each row (the answer), as in SPEC section 6.

Variants, each timed in this one process on the same batches:
  hf        engine(model)(input_ids, attention_mask, labels=...)  -- full [B, L, V] logits, what HF Trainer runs
  dstrain   engine(SupervisedLM(model))                            -- head and loss only at supervised positions

Reported per variant: effective tokens/s (non-pad tokens), MFU counting 4N FLOPs per token (LoRA: forward 2N
plus the activation-gradient half of backward; frozen weights get no weight gradients; attention FLOPs not
counted), and peak CUDA memory (max allocated). Ratios are dstrain / hf.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_model import model_config as bench_model_config

from dstrain.metrics.device import peak_tflops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32


def model_config(layers: int, vocab: int, hidden: int, heads: tuple[int, int] = (32, 4)):
    """The benchmarks' Llama shape, TinyLlama's 32/4 GQA heads by default (bench_model.py's one config)."""
    return bench_model_config("llama", vocab, hidden, layers, heads=heads[0], kv_heads=heads[1])


def build(layers: int, vocab: int, hidden: int, checkpointing: bool, heads: tuple[int, int] = (32, 4)):
    from transformers import AutoModelForCausalLM

    from dstrain.config.run import LoraConfig
    from dstrain.model.build import add_lora, enable_gradient_checkpointing

    torch.manual_seed(0)
    with torch.device(DEVICE):
        base = AutoModelForCausalLM.from_config(
            model_config(layers, vocab, hidden, heads), dtype=DTYPE, attn_implementation="sdpa"
        )
    model = add_lora(base, LoraConfig(r=16, alpha=32, dropout=0.0))
    if checkpointing:
        enable_gradient_checkpointing(model, reentrant=False)
    return model


def ds_config(micro: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro,
        "bf16": {"enabled": DEVICE == "cuda"},
        "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
        "zero_optimization": {"stage": 2},
        "steps_per_print": 10**9,
    }


def batches(n: int, micro: int, seq: int, vocab: int, answer_frac: float = 0.15):
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(10, vocab, (micro, seq), generator=gen)
        labels = torch.full_like(ids, -100)
        start = int(seq * (1 - answer_frac))
        labels[:, start:] = ids[:, start:]
        out.append(
            {
                "input_ids": ids.to(DEVICE),
                "attention_mask": torch.ones_like(ids).to(DEVICE),
                "labels": labels.to(DEVICE),
            }
        )
    return out


class HFLoss(torch.nn.Module):
    """The baseline: transformers' own forward with labels (full logits, then the shifted CE)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, labels):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss


def measure(variant: str, args) -> dict:
    import deepspeed

    from dstrain.model.supervised import SupervisedLM
    from dstrain.objectives.losses import sft_loss

    model = build(args.layers, args.vocab, args.hidden, args.checkpointing, tuple(args.heads))
    module = SupervisedLM(model) if variant == "dstrain" else HFLoss(model)
    engine, *_ = deepspeed.initialize(
        model=module,
        model_parameters=[p for p in module.parameters() if p.requires_grad],
        config=ds_config(args.micro),
    )
    data = batches(args.warmup + args.steps, args.micro, args.seq, args.vocab)
    sync()
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    losses = []
    for i, batch in enumerate(data):
        if i == args.warmup:
            sync()
            started = time.perf_counter()
        out = engine(**batch)
        loss = sft_loss(*out) if variant == "dstrain" else out
        engine.backward(loss)
        engine.step()
        losses.append(loss.detach())
    sync()
    elapsed = time.perf_counter() - started
    tokens = args.steps * args.micro * args.seq
    n_params = sum(p.numel() for p in model.parameters())
    tps = tokens / elapsed
    peak = peak_tflops(device_name())
    result = {
        "variant": variant,
        "tokens_per_s": tps,
        "step_s": elapsed / args.steps,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else None,
        "params": n_params,
        "first_loss": losses[0].item(),
        "last_loss": losses[-1].item(),
        "mfu": (4 * n_params * tps / (peak * 1e12)) if peak else None,
    }
    del engine, module, model
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return result


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def device_name() -> str:
    if DEVICE == "cuda":
        return torch.cuda.get_device_name()
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--micro", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--heads", type=int, nargs=2, default=[32, 4], metavar=("HEADS", "KV_HEADS"))
    parser.add_argument(
        "--out",
        default=os.environ.get("OUT", "."),
        help="a dir (writes gpu_bench.json there) or a .json path",
    )
    args = parser.parse_args()
    from dstrain.distributed.env import read_env
    from dstrain.distributed.group import init_process_group

    init_process_group(read_env())
    results = {
        "device": device_name(),
        "torch": torch.__version__,
        "args": vars(args),
        "runs": [measure(v, args) for v in ("hf", "dstrain")],
    }
    hf, ds = results["runs"]
    results["speedup_tokens_per_s"] = ds["tokens_per_s"] / hf["tokens_per_s"]
    if DEVICE == "cuda":
        results["peak_mem_ratio"] = ds["peak_mem_gib"] / hf["peak_mem_gib"]
    text = json.dumps(results, indent=2)
    print(text)
    out = Path(args.out)
    (out if out.suffix == ".json" else out / "gpu_bench.json").write_text(text + "\n")


if __name__ == "__main__":
    main()
