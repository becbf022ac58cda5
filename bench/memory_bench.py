"""Memory benchmark: peak memory per rank for each shipped ZeRO JSON, QLoRA vs bf16 base weights, and dstrain's
chunked supervised-only logits vs transformers' full [batch, seq, vocab] logits; each next to dstrain's own
estimate (dstrain/model/memory.py), which is what this bench validates.

    python bench/memory_bench.py all            # the three parts below, one after the other
    python bench/memory_bench.py zero           # 2 ranks (deepspeed --num_gpus 2) per ZeRO JSON
    python bench/memory_bench.py qlora          # base weight bytes: 4-bit NF4 vs bf16
    python bench/memory_bench.py logits         # one forward/backward each, fresh process per variant

Model: random-init Llama-shaped, hidden 1024, 12 layers (4 for the logits part), intermediate 2816, 16 heads
(4 KV), vocab 32,000, untied head: ~200M params; fp32 on CPU (bf16 base for the QLoRA part). LoRA r16 on
all linear layers, dropout 0.05. Rows are filled to max_seq_len (long synthetic passages), the estimate's
worst case. Peak memory: CPU: growth of the rank process's VmHWM from just before the model is built to the
end (RSS, what the OS must provide); CUDA: torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench_model import write_model  # noqa: E402  (bench/ is the script's dir)
from bench_workload import write_filler_records  # noqa: E402

ZERO_CONFIGS = ("zero2", "zero2_offload", "zero3", "zero3_offload")
MODEL = {"shape": "llama", "vocab": 32000, "hidden": 1024, "heads": 16, "kv_heads": 4}  # see the docstring
MiB = 1024**2


def machine() -> str:
    import psutil
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    ram = psutil.virtual_memory().total / 1024**3
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {ram:.0f} GiB RAM, {gpu}, torch {torch.__version__}"


def run_config(work: Path, model: Path, ds_name: str, args: argparse.Namespace) -> Path:
    """A run YAML and a copy of the shipped ZeRO JSON with the bench's micro batch."""
    import yaml

    from dstrain.config.zero import find_ds_config

    ds = json.loads(find_ds_config(f"{ds_name}.json").read_text())
    ds["train_micro_batch_size_per_gpu"] = args.micro
    ds_path = work / f"{ds_name}.json"
    ds_path.write_text(json.dumps(ds))
    raw = {
        "model": {"path": str(model), "dtype": "fp32"},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
        "data": {
            "train": [str(write_filler_records(work / "long.jsonl", 64))],
            "format": "sft-rag",
            "max_seq_len": args.seq,
            "max_passage_tokens": args.seq - 56,
        },
        "train": {
            "max_steps": args.steps,
            "log_every": 1,
            "save_every": 0,
            "global_batch_size": 2 * args.micro,
        },
        "ds_config": str(ds_path),
        "output_dir": str(work / f"run-{ds_name}"),
    }
    path = work / f"{ds_name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def held_parameter_bytes(module: object) -> int:
    """Parameter storage this rank holds after training: its ZeRO-3 partition, or the whole tensor.

    Unlike peak RSS (dominated on CPU by loading: every rank maps and reads the whole checkpoint file),
    this is what the rank keeps for the rest of the run."""
    held = 0
    for param in module.parameters():  # type: ignore[attr-defined]
        tensor = param.ds_tensor if hasattr(param, "ds_tensor") else param
        held += tensor.numel() * tensor.element_size()
    return held


def rank_main(args: argparse.Namespace) -> None:
    """Under the launcher: train `--steps` steps and print this rank's measured and estimated peak."""
    import torch

    from dstrain.config.run import load_config
    from dstrain.distributed import group
    from dstrain.model import build as model
    from dstrain.model import memory
    from dstrain.training.loop import fit
    from dstrain.training.setup import start

    seen: dict = {}
    build = model.build_model

    def measured_build(*a, **k):  # type: ignore[no-untyped-def]
        seen["before"] = memory.rss_bytes()
        memory.reset_peak_rss()
        built = build(*a, **k)
        seen["shape"] = memory.model_shape(built)  # read before ZeRO-3 partitions it
        return built

    model.build_model = measured_build
    cfg = load_config(args.config)
    session, tally, state = start(cfg)
    fit(session, tally, state)
    setup = memory.setup_from(cfg, session.ds, session.plan.micro, session.plan.world)
    terms = memory.estimate(seen["shape"], setup)
    report = {
        "rank": session.rank,
        "rss_growth": memory.rss_bytes("VmHWM") - seen["before"],
        "estimate_peak_host": memory.peak_estimate(seen["shape"], setup),
        "estimate_train": sum(t.bytes for t in terms),
        "estimate_build": memory.build_peak_bytes(seen["shape"], setup),
        "cuda_max_allocated": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
        "estimate_device": memory.totals(terms)["device"],
        "params": sum(getattr(p, "ds_numel", p.numel()) for p in session.peft_model.parameters()),
        "param_bytes_held": held_parameter_bytes(session.peft_model),
    }
    print("RESULT " + json.dumps(report), flush=True)
    session.sink.close()
    group.shutdown()


def launch(cmd: list[str], cwd: Path) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    rows = [json.loads(x.split("RESULT ", 1)[1]) for x in proc.stdout.splitlines() if "RESULT " in x]
    if proc.returncode != 0 or not rows:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return rows


def bench_zero(args: argparse.Namespace, work: Path) -> None:
    from dstrain.distributed.env import free_port

    model = write_model(work / "model-12l", layers=args.layers, **MODEL)
    launcher = str(Path(sys.executable).parent / "deepspeed")
    results = {}
    for name in ZERO_CONFIGS:
        config = run_config(work, model, name, args)
        cmd = [launcher, "--num_gpus", "2", "--master_port", str(free_port()), __file__, "rank"]
        try:
            rows = launch([*cmd, "--config", str(config)], REPO)
        except SystemExit as exc:  # report the others; say which failed and why
            lines = [x for x in str(exc).splitlines() if "Error" in x]
            print(f"{name}: FAILED: {lines[-1] if lines else str(exc)[-300:]}", file=sys.stderr)
            continue
        results[name] = max(rows, key=lambda r: r["rss_growth"])
        print(f"RESULT {name} " + json.dumps(results[name]), flush=True)  # partial results survive a kill
    if "zero2" not in results:
        return
    params = results["zero2"]["params"]
    print(
        f"\n## ZeRO configs: peak per rank (max of 2 ranks), {params / 1e6:.0f}M params fp32, micro "
        f"{args.micro} x seq {args.seq}, {args.steps} steps\n{machine()}\n"
    )
    print(
        "| config | measured RSS growth | estimate (peak: max(build, train)) | est/measured | vs zero2 "
        "| parameters held per rank | vs zero2 |"
    )
    print("|---|---|---|---|---|---|---|")
    held = results["zero2"]["param_bytes_held"]
    base = results["zero2"]["rss_growth"]
    for name, r in results.items():
        print(
            f"| {name} | {r['rss_growth'] / MiB:,.0f} MiB | {r['estimate_peak_host'] / MiB:,.0f} MiB "
            f"(build {r['estimate_build'] / MiB:,.0f}, train {r['estimate_train'] / MiB:,.0f}) | "
            f"{r['estimate_peak_host'] / r['rss_growth']:.2f} | {r['rss_growth'] / base:.2f} "
            f"| {r['param_bytes_held'] / MiB:,.0f} MiB | {r['param_bytes_held'] / held:.2f} |"
        )
    (work / "zero.json").write_text(json.dumps(results, indent=2))


def qlora_main(args: argparse.Namespace) -> None:
    """One process: build the same base in bf16 and in 4-bit and print the frozen base bytes of each."""
    from dstrain.config.run import LoraConfig, ModelConfig
    from dstrain.model import memory
    from dstrain.model.build import build_model

    cfg = ModelConfig(path=args.model, dtype="bf16", load_in_4bit=args.four_bit)
    before = memory.rss_bytes()
    memory.reset_peak_rss()
    built = build_model(cfg, LoraConfig(r=16, alpha=32, dropout=0.05), zero_stage=2)
    shape = memory.model_shape(built)
    rss = memory.rss_bytes("VmHWM") - before
    layers = built.get_base_model().get_decoder().layers  # the quantised part (embeddings and head stay bf16)
    frozen_layers = sum(
        memory.tensor_bytes(p) for layer in layers for p in layer.parameters() if not p.requires_grad
    )
    row = {"frozen_bytes": shape.frozen_bytes, "layer_bytes": frozen_layers, "rss_growth": rss}
    print("RESULT " + json.dumps(row), flush=True)


def bench_qlora(args: argparse.Namespace, work: Path) -> None:
    import importlib.util

    model = write_model(work / "model-12l", layers=args.layers, **MODEL)
    if importlib.util.find_spec("bitsandbytes") is None:
        print("\n## QLoRA: skipped (bitsandbytes not installed)")
        return
    rows = {}
    for four_bit in (False, True):
        cmd = [sys.executable, __file__, "qlora-build", "--model", str(model)]
        try:
            rows[four_bit] = launch([*cmd, *(["--four-bit"] if four_bit else [])], REPO)[0]
        except SystemExit as exc:  # model.load_in_4bit not usable in this checkout yet
            print(f"\n## QLoRA: skipped ({str(exc)[-300:]})")
            return
    bf16, nf4 = rows[False], rows[True]
    print(
        f"\n## QLoRA: frozen base weight bytes, 4-bit NF4 vs bf16 (same {args.layers}-layer model)\n"
        f"{machine()}\n"
    )
    print(
        "| base | all frozen bytes (= the estimate's base term) | decoder layers' frozen bytes | RSS growth of build |"
    )
    print("|---|---|---|---|")
    for label, r in (("bf16", bf16), ("4-bit NF4", nf4)):
        print(
            f"| {label} | {r['frozen_bytes'] / MiB:,.0f} MiB | {r['layer_bytes'] / MiB:,.0f} MiB "
            f"| {r['rss_growth'] / MiB:,.0f} MiB |"
        )
    print(
        f"\nratio 4-bit / bf16: all frozen bytes {nf4['frozen_bytes'] / bf16['frozen_bytes']:.3f}, decoder layers "
        f"{nf4['layer_bytes'] / bf16['layer_bytes']:.3f} (target <= 0.35; embeddings and head stay bf16)"
    )


def logits_main(args: argparse.Namespace) -> None:
    """One forward/backward of `--variant` on a fresh model; peak RSS growth over the step and the estimate."""
    import torch

    from dstrain.config.run import LoraConfig, ModelConfig
    from dstrain.model import memory
    from dstrain.model.build import build_model
    from dstrain.model.supervised import SupervisedLM

    torch.manual_seed(0)
    peft_model = build_model(ModelConfig(path=args.model), LoraConfig(r=16, alpha=32, dropout=0.05), 2)
    ids = torch.randint(0, 2048, (args.micro, args.seq))
    mask = torch.ones_like(ids)
    labels = torch.full_like(ids, -100)
    start = args.seq - int(args.seq * args.answer_frac) if args.answer_frac < 1 else 0
    labels[:, start:] = ids[:, start:]
    if args.variant.startswith("head-"):
        return head_only(args, peft_model, labels)
    before = memory.rss_bytes()
    memory.reset_peak_rss()
    if args.variant == "hf":
        loss = peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss
    else:
        chunk = 0 if args.variant == "dstrain-unchunked" else args.chunk
        total, count = SupervisedLM(peft_model, chunk)(ids, mask, labels)
        loss = total / count
    loss.backward()
    growth = memory.rss_bytes("VmHWM") - before
    shape = memory.model_shape(peft_model)
    setup = memory.Setup(
        stage=0,
        world=1,
        micro=args.micro,
        seq=args.seq,
        compute_elem=4,
        checkpointing=False,
        lora_dropout=True,
        eager_attention=False,
        logits_chunk=0 if args.variant != "dstrain" else args.chunk,
    )
    # The estimate is the worst case (every position supervised); with 15% answers dstrain's head sees fewer.
    est = memory.activation_bytes(shape, setup) + memory.logits_bytes(shape, setup)
    print("RESULT " + json.dumps({"rss_growth": growth, "estimate": est}), flush=True)


def head_only(args: argparse.Namespace, peft_model: object, labels: object) -> None:
    """The head and loss alone on random hidden states [micro x seq, hidden]: the logits memory, isolated.

    head-hf: logits at every position, upcast, cross-entropy (what transformers' `labels=` loss does);
    head-dstrain: dstrain's target_logps at the labelled positions only, `--chunk` at a time.
    """
    import torch
    import torch.nn.functional as F

    from dstrain.model import memory

    try:  # where dstrain's chunked head lives (dstrain.model.head since d0e9a6f)
        from dstrain.model.head import target_logps
    except ImportError:
        from dstrain.model.supervised import target_logps

    base = peft_model.get_base_model()
    head = base.get_output_embeddings()
    hidden = torch.randn(args.micro * args.seq, base.config.hidden_size, requires_grad=True)
    targets = labels.reshape(-1)
    before = memory.rss_bytes()
    memory.reset_peak_rss()
    if args.variant == "head-hf":
        loss = F.cross_entropy(head(hidden).float(), targets, ignore_index=-100)
    else:
        keep = targets != -100
        loss = -target_logps(head, hidden[keep], targets[keep], args.chunk).mean()
    loss.backward()
    growth = memory.rss_bytes("VmHWM") - before
    shape = memory.model_shape(peft_model)
    chunk = 0 if args.variant == "head-hf" else args.chunk
    setup = memory.Setup(0, 1, args.micro, args.seq, 4, False, True, False, chunk)
    print("RESULT " + json.dumps({"rss_growth": growth, "estimate": memory.logits_bytes(shape, setup)}))


def bench_logits(args: argparse.Namespace, work: Path) -> None:
    model = write_model(work / "model-4l", layers=4, **MODEL)
    variants = ("hf", "dstrain", "dstrain-unchunked", "head-hf", "head-dstrain")
    print(
        f"\n## Logits: one forward/backward, micro {args.logits_micro} x seq {args.logits_seq}, vocab 32,000, "
        f"4-layer hidden-1024 model, fp32, chunk {args.chunk}\n{machine()}\n"
    )
    print(
        "| answer fraction | variant | measured RSS growth of the step | estimate (activations + logits) "
        "| vs hf (head-*: vs head-hf; estimate: logits only) |"
    )
    print("|---|---|---|---|---|")
    for frac in (0.15, 1.0):
        rows = {}
        for variant in variants:
            cmd = [
                sys.executable,
                __file__,
                "logits-step",
                "--model",
                str(model),
                "--variant",
                variant,
                "--micro",
                str(args.logits_micro),
                "--seq",
                str(args.logits_seq),
                "--answer-frac",
                str(frac),
                "--chunk",
                str(args.chunk),
            ]
            rows[variant] = launch(cmd, REPO)[0]
        for variant, r in rows.items():
            print(
                f"| {frac:.0%} | {variant} | {r['rss_growth'] / MiB:,.0f} MiB | {r['estimate'] / MiB:,.0f} MiB "
                f"| {r['rss_growth'] / rows['head-hf' if variant.startswith('head-') else 'hf']['rss_growth']:.2f} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "part", choices=["all", "zero", "qlora", "logits", "rank", "qlora-build", "logits-step"]
    )
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--micro", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--logits-micro", type=int, default=4)
    parser.add_argument("--logits-seq", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--answer-frac", type=float, default=0.15)
    parser.add_argument("--variant", default="dstrain")
    parser.add_argument("--config")
    parser.add_argument("--model")
    parser.add_argument("--four-bit", action="store_true")
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "dstrain-memory-bench"))
    parser.add_argument("--local_rank", type=int, default=None)
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.part == "rank":
        return rank_main(args)
    if args.part == "qlora-build":
        return qlora_main(args)
    if args.part == "logits-step":
        return logits_main(args)
    for part, fn in (("zero", bench_zero), ("qlora", bench_qlora), ("logits", bench_logits)):
        if args.part in (part, "all"):
            fn(args, work)
    return None


if __name__ == "__main__":
    main()
