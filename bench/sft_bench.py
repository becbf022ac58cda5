"""SFT effective tokens/s: dstrain vs transformers.Trainer vs TRL SFTTrainer, same run, same everything.

    python bench/sft_bench.py                 # full: 2,000 records (one epoch), vocab 3,000 and 32,000:
                                              # 10 launches, ~30 min on the idle 2-core box
    python bench/sft_bench.py --quick         # 8 steps, 3 launches: checks every path works

Same model dir (random-init Qwen2 shape, hidden 256, 4 layers; the bundled tokenizer), same data (generated
sft-rag records: ~181 tokens, answers ~15%), same fully resolved ZeRO-2 JSON, micro batch 4 x 2 ranks, LoRA
r16 all-linear, fp32 (CPU) or bf16 (--dtype bf16 on GPU). Each row is its own `deepspeed --num_gpus N` launch:

  dstrain          deepspeed --module dstrain.train, data.group_by_length=true, model.logits_chunk_tokens
                   (loss and head only at the answer positions)
  dstrain-plain    the same without length grouping (what group_by_length alone buys)
  dstrain-micro    the same with objective.loss_normalization=micro_batch (what normalising the loss over
                   the global batch costs: a host count and one small all-reduce per step)
  hf               transformers.Trainer(deepspeed=<same dict>), PEFT LoRA, labels -100 on the prompt
  hf-grouped       the same with train_sampling_strategy="group_by_length" (HF's length grouping)
  hf-liger         the same with use_liger_kernel=True: Liger's Triton kernels, its fused linear
                   cross-entropy (no [B, L, V] logits: the same idea as dstrain's chunked head); needs CUDA
  trl              trl.SFTTrainer, prompt/completion dataset, completion-only loss, LoRA peft_config

Measured identically everywhere: wall time from the end of optimizer step `--warmup` to the end of the last
step, and the non-padding tokens (attention-mask ones) of the rows trained in those steps, summed over ranks.
Printed: one table per vocab size with tokens/s and the ratios dstrain/hf, dstrain/hf-grouped, dstrain/trl
(targets: >= 1.25x HF Trainer, >= 2x TRL SFTTrainer). Logs of every launch stay in --work-dir. With --out,
the JSON is rewritten after every row ("complete": false until the last), so a run cut short keeps its rows.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common as bc
import bench_model as bm
import bench_report as br
import bench_workload as bw

# name -> (runner, options)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "dstrain": ("dstrain", {"data.group_by_length": True}),
    "dstrain-plain": ("dstrain", {"data.group_by_length": False}),
    # the loss as each micro batch's own mean (objective.loss_normalization before issue 27): what the
    # global-batch normalisation costs is dstrain / dstrain-micro
    "dstrain-micro": (
        "dstrain",
        {"data.group_by_length": True, "objective.loss_normalization": "micro_batch"},
    ),
    "hf": ("sft-hf", {}),
    "hf-grouped": ("sft-hf", {"group_by_length": True}),
    "hf-liger": ("sft-hf", {"use_liger_kernel": True}),
    "trl": ("sft-trl", {}),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="96 records, 8 steps, vocab 3,000, rows dstrain/hf/trl: ~1.5 min idle (launch start-up dominates)",
    )
    parser.add_argument("--records", type=int, default=2000)
    parser.add_argument(
        "--steps", type=int, default=0, help="optimizer steps; 0: one epoch (records / global)"
    )
    parser.add_argument("--warmup", type=int, default=10, help="steps left out of the timing")
    parser.add_argument("--vocab", type=int, nargs="+", default=[3000, 32000])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--shape", choices=["qwen2", "llama"], default="qwen2")
    parser.add_argument("--micro", type=int, default=4)
    parser.add_argument("--nproc", type=int, default=2, help="ranks (deepspeed --num_gpus)")
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--max-passage-tokens", type=int, default=384)
    parser.add_argument(
        "--records-kind",
        choices=["short", "long", "long8k"],
        default="short",
        help="short: SPEC s.6 shape (~181 tokens); long: GPU shape (4-6 long passages, rows ~1,800 tokens); "
        "long8k: 4-6 passages of 800-1,200 words (rows of ~7,800 tokens with --max-passage-tokens 7600)",
    )
    bc.add_run_arguments(parser, list(VARIANTS))
    args = parser.parse_args(argv)
    if args.quick:
        args.records, args.warmup = min(args.records, 96), 2
        args.steps = args.steps or 8
        args.variants = [v for v in args.variants if v not in ("dstrain-plain", "hf-grouped", "hf-liger")]
        args.vocab = args.vocab[:1]
    return args


def make_data(path: Path, args: argparse.Namespace) -> Path:
    if args.records_kind == "long":
        return bw.write_long_sft_records(path, args.records, seed=0)
    if args.records_kind == "long8k":
        return bw.write_long_sft_records(path, args.records, seed=0, words_per_passage=(800, 1200))
    return bw.write_sft_records(path, args.records, seed=0)


def bench_vocab(
    vocab: int, args: argparse.Namespace, work_dir: Path, data: Path, progress: Any = None
) -> dict[str, Any]:
    """One table; `progress(run)` gets the run's results so far after every row."""
    model, work, global_batch = bc.prepare_workload(vocab, args, work_dir, data, args.records)
    params = bm.count_params(Path(model))
    steps = work.steps
    label = f"model {args.model_dir}" if args.model_dir else f"vocab {vocab}"
    print(
        f"\n== {label}: {steps} steps of {global_batch} rows, timing after step {args.warmup}",
        flush=True,
    )
    results: dict[str, bc.Throughput | None] = {}
    for name in br.run_order(args.variants, args.order):
        runner, options = VARIANTS[name]
        results[name] = bc.run_variant(
            f"{name}-v{vocab}", runner, work, work_dir, options, args.nproc, args.timeout
        )
        if progress:
            progress({"vocab": vocab, "steps": steps, "params": params, "results": br.as_dicts(results)})
    rows = []
    for name, res in results.items():
        if res is None:
            rows.append([name, "failed", "", "", "", "", ""])
            continue
        rows.append(
            [
                name,
                f"{res.tokens_per_s:,.0f}",
                f"{res.tokens:,}",
                f"{res.seconds:.1f}",
                f"{res.loss:.4f}" if res.loss is not None else "",
                f"{res.peak_mem_gb:.2f}" if res.peak_mem_gb else "",
                br.fmt_mfu(br.mfu(res.tokens_per_s, params, args.nproc)),
            ]
        )
    br.print_table(
        f"SFT, {label}, {steps} steps (timed after {args.warmup}), micro {args.micro} x {args.nproc} ranks",
        [
            "variant",
            "tokens/s",
            "tokens timed",
            "seconds",
            "last loss",
            "peak CUDA GB",
            "MFU (4N FLOPs/token)",
        ],
        rows,
    )
    best = results.get("dstrain")
    bases = ("hf", "hf-grouped", "hf-liger", "trl")
    ratios = {f"dstrain/{base}": br.ratio(best, results.get(base)) for base in bases if base in results}
    if "dstrain-plain" in results:
        ratios["dstrain-plain/hf"] = br.ratio(results["dstrain-plain"], results.get("hf"))
    print(
        "ratios: "
        + ", ".join(f"{k} {v}" for k, v in ratios.items())
        + "  (targets: /hf >= 1.25x, /trl >= 2x)"
    )
    return {
        "vocab": vocab,
        "steps": steps,
        "params": params,
        "results": br.as_dicts(results),
        "ratios": ratios,
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dstrain-sft-bench-") as tmp:
        work_dir = args.work_dir or Path(tmp)
        work_dir.mkdir(parents=True, exist_ok=True)
        data = make_data(work_dir / "sft.jsonl", args)
        stats = bw.token_stats(data, "sft-rag", args.max_seq_len, args.max_passage_tokens)
        machine = br.machine_line()
        print(machine)
        print(
            f"data: {stats['rows']} sft-rag records, mean {stats['mean_tokens']:.0f} tokens, "
            f"answers {stats['answer_share']:.1%} of tokens; work dir {work_dir}",
            flush=True,
        )
        header = {"machine": machine, "data": stats, "args": vars(args)}
        br.run_tables(args, header, lambda v, p: bench_vocab(v, args, work_dir, data, p), started)


if __name__ == "__main__":
    main()
