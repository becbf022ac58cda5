"""DPO pairs/s: dstrain vs TRL DPOTrainer, same run, same model, data, ZeRO JSON, beta and lengths.

    python bench/dpo_bench.py                 # full: 1,000 preference pairs, vocab 3,000 and 32,000 (CPU)
    python bench/dpo_bench.py --quick         # toy sizes, a few minutes: checks every path works
    python bench/dpo_bench.py --variants dstrain orpo trl-orpo   # ORPO against DPO and TRL's ORPOTrainer

Generated preference RAG records (SPEC s.2: query, 3-5 long retrieved passages shared by both answers, a
chosen and a rejected answer), a random-init Qwen2-shaped model (hidden 256, 4 layers) with the bundled
tokenizer, micro batch 4 pairs x 2 ranks, ZeRO-2, LoRA r16 all-linear, beta 0.1, max length 512 for prompt +
answer (both frameworks cut passages the same way: TRL gets the prompt text dstrain renders). Each row is its
own `deepspeed --num_gpus N` launch:

  dstrain           objective.name=dpo, data.format=preference, data.share_prompt=true (prompt, chosen and
                    rejected in one row: the prompt is computed once), reference = the policy with its adapter
                    disabled (dstrain's default)
  dstrain-unshared  the same with data.share_prompt=false (2 rows per pair, as TRL)
  dstrain-micro     the same as dstrain with objective.loss_normalization=micro_batch (the cost of the
                    global-batch normalisation)
  trl               trl.DPOTrainer(ref_model=None) with a LoRA peft_config: the reference is the policy with
                    the adapter disabled, 2 rows per pair
  orpo              dstrain with objective.name=orpo (beta = ORPO's lambda), shared prompt: no reference pass.
                    Printed: its step time over dstrain DPO's (same steps of the same pairs)
  trl-orpo          trl.experimental.orpo.ORPOTrainer with a LoRA peft_config (TRL 1.x), 2 rows per pair

With --out, the JSON is rewritten after every row ("complete": false until the last).

Measured identically: wall time from the end of optimizer step `--warmup` to the end of the last step, and the
pairs trained in those steps, summed over ranks. Printed: pairs/s and dstrain/trl (target >= 1.5x).
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

# name: (runner, run options, objective)
VARIANTS: dict[str, tuple[str, dict[str, Any], str]] = {
    "dstrain": ("dstrain", {"data.share_prompt": True}, "dpo"),
    "dstrain-unshared": ("dstrain", {"data.share_prompt": False}, "dpo"),
    "dstrain-micro": (
        "dstrain",
        {"data.share_prompt": True, "objective.loss_normalization": "micro_batch"},
        "dpo",
    ),
    "trl": ("dpo-trl", {}, "dpo"),
    "orpo": ("dstrain", {"data.share_prompt": True}, "orpo"),
    "trl-orpo": ("orpo-trl", {}, "orpo"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="toy sizes: 64 pairs, 6 steps, one vocab")
    parser.add_argument("--pairs", type=int, default=1000, help="preference records generated")
    parser.add_argument("--steps", type=int, default=0, help="optimizer steps; 0: one epoch (pairs / global)")
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the timing")
    parser.add_argument("--vocab", type=int, nargs="+", default=[3000, 32000])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--shape", choices=["qwen2", "llama"], default="qwen2")
    parser.add_argument("--micro", type=int, default=4, help="pairs per rank per micro batch")
    parser.add_argument("--nproc", type=int, default=2, help="ranks (deepspeed --num_gpus)")
    parser.add_argument("--max-seq-len", type=int, default=512, help="prompt + one answer")
    parser.add_argument("--max-passage-tokens", type=int, default=384)
    parser.add_argument(
        "--passage-words",
        type=int,
        nargs=2,
        default=[40, 70],
        metavar=("MIN", "MAX"),
        help="words per retrieved passage (3-5 passages per record)",
    )
    parser.add_argument("--beta", type=float, default=0.1)
    bc.add_run_arguments(parser, list(VARIANTS))
    args = parser.parse_args(argv)
    if args.quick:
        args.pairs, args.warmup = min(args.pairs, 64), 2
        args.steps = args.steps or 6
        args.vocab = args.vocab[:1]
        args.variants = [v for v in args.variants if v != "dstrain-unshared"]
    return args


def bench_vocab(
    vocab: int, args: argparse.Namespace, work_dir: Path, data: Path, progress: Any = None
) -> dict[str, Any]:
    """One table; `progress(run)` gets the run's results so far after every row."""
    model, work, global_batch = bc.prepare_workload(vocab, args, work_dir, data, args.pairs, beta=args.beta)
    params = bm.count_params(Path(model))
    steps = work.steps
    label = f"model {args.model_dir}" if args.model_dir else f"vocab {vocab}"
    print(
        f"\n== {label}: {steps} steps of {global_batch} pairs, timing after step {args.warmup}",
        flush=True,
    )
    results: dict[str, bc.Throughput | None] = {}
    for name in br.run_order(args.variants, args.order):
        runner, options, objective = VARIANTS[name]
        results[name] = bc.run_variant(
            f"dpo-{name}-v{vocab}", runner, work, work_dir, options, args.nproc, args.timeout, objective
        )
        if progress:
            progress({"vocab": vocab, "steps": steps, "params": params, "results": br.as_dicts(results)})
    rows = []
    for name, res in results.items():
        if res is None:
            rows.append([name, "failed", "", "", "", "", "", ""])
            continue
        rows.append(
            [
                name,
                f"{res.pairs_per_s:.2f}",
                f"{res.pairs:,}",
                f"{res.tokens_per_s:,.0f}",
                f"{res.seconds:.1f}",
                f"{res.loss:.4f}" if res.loss is not None else "",
                f"{res.peak_mem_gb:.2f}" if res.peak_mem_gb else "",
                br.fmt_mfu(br.mfu(res.tokens_per_s, params, args.nproc)),
            ]
        )
    br.print_table(
        f"DPO, {label}, {steps} steps (timed after {args.warmup}), {args.micro} pairs x {args.nproc} ranks",
        [
            "variant",
            "pairs/s",
            "pairs timed",
            "tokens/s (rows as fed)",
            "seconds",
            "last loss",
            "peak CUDA GB",
            "MFU (4N FLOPs/token as fed)",
        ],
        rows,
    )
    ratios = {
        f"{name}/trl": br.ratio(results.get(name), results.get("trl"), pairs=True)
        for name in ("dstrain", "dstrain-unshared")
        if name in results
    }
    print("ratios (pairs/s): " + ", ".join(f"{k} {v}" for k, v in ratios.items()) + "  (target: >= 1.5x)")
    if results.get("orpo") and results.get("dstrain"):
        # equal steps of equal pairs: the step-time ratio is the inverse of the pairs/s ratio
        ratios["orpo/dpo step time"] = br.ratio(results["dstrain"], results["orpo"], pairs=True)
        print(f"orpo step time / dstrain dpo step time: {ratios['orpo/dpo step time']}")
    if results.get("orpo") and results.get("trl-orpo"):
        ratios["orpo/trl-orpo"] = br.ratio(results["orpo"], results["trl-orpo"], pairs=True)
        print(f"pairs/s, dstrain orpo / trl ORPOTrainer: {ratios['orpo/trl-orpo']}")
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
    with tempfile.TemporaryDirectory(prefix="dstrain-dpo-bench-") as tmp:
        work_dir = args.work_dir or Path(tmp)
        work_dir.mkdir(parents=True, exist_ok=True)
        data = bw.write_preference_records(
            work_dir / "pref.jsonl", args.pairs, seed=0, passage_words=tuple(args.passage_words)
        )
        stats = bw.pair_stats(data, args.max_seq_len, args.max_passage_tokens)
        machine = br.machine_line()
        print(machine)
        print(
            f"data: {stats['pairs']} preference pairs, mean prompt {stats['prompt']:.0f} tokens, answers "
            f"{stats['chosen']:.0f} / {stats['rejected']:.0f} tokens (shared row {stats['shared']:.0f} vs two rows "
            f"{stats['unshared']:.0f}: {stats['unshared'] / stats['shared']:.2f}x); work dir {work_dir}",
            flush=True,
        )
        header = {"machine": machine, "data": stats, "args": vars(args)}
        br.run_tables(args, header, lambda v, p: bench_vocab(v, args, work_dir, data, p), started)


if __name__ == "__main__":
    main()
