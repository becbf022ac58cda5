"""Learning check: does a dstrain run make the bundled tiny model better at a retrieval-grounded task?

The task is generated (dstrain/data/synthetic.py): each record asks for the code of an entity, one passage gives
it, the others are distractors; entity and code are drawn afresh per record, so the answer can only be read out
of the passages. Three real `dstrain train` runs (one process, ZeRO-2, CPU, LoRA r=16) on it:
  sft  held-out exact match and token F1 of greedy answers (eval_generate over the whole eval split)
  dpo_nll, dpo  held-out preference accuracy (implicit reward margin > 0) and mean reward margin, beta 0.5;
       chosen = the code in the passage, rejected = a code no passage mentions. The chance level printed beside
       it is the base model's own preference (log-prob of chosen > rejected): at step 0 every margin is 0.
  kto  on the unpaired records (each answer the grounded code, desirable, or the hallucinated one, not; half
       of each), beta 0.5: the held-out desirable-minus-undesirable reward margin and eval loss (not plotted).
       Not reliable on this task at these settings (BENCHMARKS.md, KTO learning check): run it with --runs kto.

Run:  python bench/learning_bench.py [--out bench/results] [--sft-steps 1500] [--dpo-nll-steps 800]
                                    [--dpo-steps 1500] [--kto-steps 600] [--runs sft dpo_nll dpo [kto]]
Writes learning.png (the curves) and learning.json (every eval row) under --out; prints the table recorded in
BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import AutoModelForCausalLM

from dstrain.config.run import DataConfig, ModelConfig
from dstrain.data.pairs import answer_logps, collate_pairs, split_pair, tokenize_pair
from dstrain.data.records import parse_record
from dstrain.data.synthetic import TaskSpec, run_config, write_task
from dstrain.model.build import builtin_dir, load_tokenizer


def train(config: dict[str, Any], work: Path, name: str) -> tuple[list[dict], float]:
    """Run `dstrain train` on `config`; its eval rows and the wall time."""
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "dstrain.cli", "train", "--config", str(path)],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode:
        sys.exit(f"{name}: dstrain train failed (exit {proc.returncode})\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (Path(config["output_dir"]) / "metrics.jsonl").open()]
    return [r for r in rows if "eval_loss" in r], time.perf_counter() - started


@torch.no_grad()
def base_preference(eval_file: Path, cfg: dict[str, Any]) -> float:
    """Share of eval pairs whose chosen answer the base model (no adapter) already scores higher."""
    tokenizer = load_tokenizer(ModelConfig())
    data = DataConfig(
        max_seq_len=cfg["data"]["max_seq_len"], max_passage_tokens=cfg["data"]["max_passage_tokens"]
    )
    model = AutoModelForCausalLM.from_pretrained(str(builtin_dir("tiny")), dtype=torch.float32).eval()
    lines = eval_file.read_text(encoding="utf-8").splitlines()
    pairs = [tokenize_pair(tokenizer, parse_record(json.loads(line), "preference"), data) for line in lines]
    wins = 0
    for start in range(0, len(pairs), 16):
        batch = collate_pairs(pairs[start : start + 16], tokenizer.pad_token_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        chosen, rejected = split_pair(answer_logps(logits, batch["labels"]))
        wins += int((chosen > rejected).sum())
    return wins / len(pairs)


def plot(runs: dict[str, list[dict]], chance: float, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    sft = runs.get("sft", [])
    steps = [r["step"] for r in sft]
    left.plot(steps, [r["eval_exact_match"] for r in sft], marker="o", label="exact match")
    left.plot(steps, [r["eval_token_f1"] for r in sft], marker=".", label="token F1")
    left.set(title="SFT: greedy answers on held-out records", xlabel="step", ylim=(-0.02, 1.02))
    left.legend()
    for name in (n for n in PREFERENCE if n in runs):
        rows = runs[name]
        right.plot([r["step"] for r in rows], [r["eval_pref_acc"] for r in rows], marker="o", label=name)
    right.axhline(chance, color="grey", linestyle="--", label=f"base model's own preference ({chance:.0%})")
    right.set(title="preference accuracy on held-out pairs", xlabel="step", ylim=(-0.02, 1.02))
    right.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


PREFERENCE = ("dpo_nll", "dpo")
METRICS = {
    "sft": ("eval_exact_match", "eval_token_f1"),
    "dpo_nll": ("eval_pref_acc", "eval_reward_margin"),
    "dpo": ("eval_pref_acc", "eval_reward_margin"),
    "kto": ("eval_reward_margin", "eval_loss"),
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--sft-steps", type=int, default=1500)
    parser.add_argument("--dpo-nll-steps", type=int, default=800)
    parser.add_argument("--dpo-steps", type=int, default=1500)
    parser.add_argument("--kto-steps", type=int, default=600)
    parser.add_argument("--runs", nargs="+", choices=list(METRICS), default=["sft", "dpo_nll", "dpo"])
    parser.add_argument("--train-records", type=int, default=24_000)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    steps = {
        "sft": args.sft_steps,
        "dpo_nll": args.dpo_nll_steps,
        "dpo": args.dpo_steps,
        "kto": args.kto_steps,
    }
    steps = {name: n for name, n in steps.items() if name in args.runs}
    runs: dict[str, list[dict]] = {}
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        files = write_task(work / "data", load_tokenizer(ModelConfig()), TaskSpec(train=args.train_records))
        for name, n in steps.items():
            cfg = run_config(name, files, work / name, n, max(n // 10, 1))
            runs[name], seconds[name] = train(cfg, work, name)
        chance = base_preference(files["preference_eval"], cfg)
    plot(runs, chance, args.out / "learning.png")
    result = {"runs": runs, "seconds": seconds, "base_preference": chance}
    (args.out / "learning.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    print("| run | steps | wall s | metric | step 0 | final | best |")
    print("|---|---|---|---|---|---|---|")
    for name, metrics in ((n, m) for n, m in METRICS.items() if n in runs):
        rows = runs[name]
        for metric in metrics:
            values = [r[metric] for r in rows]
            print(
                f"| {name} | {rows[-1]['step']} | {seconds[name]:.0f} | {metric} | {values[0]:.3f} | "
                f"{values[-1]:.3f} | {max(values):.3f} |"
            )
    for name, rows in runs.items():
        metric = METRICS[name][0]
        print(f"{name} {metric} by step: " + " ".join(f"{r['step']}:{r[metric]:.2f}" for r in rows))
    print(f"base model's own preference for the chosen answer (chance level of eval_pref_acc): {chance:.3f}")
    print(f"wrote {args.out / 'learning.png'} and {args.out / 'learning.json'}")


if __name__ == "__main__":
    main()
