"""Learning spread: where the learning checks of tests/integration/test_learning.py land across seeds and
CPU kernel sets, so their bars can sit well below the worst outcome (issue 32).

The same `dstrain train` runs as the tests (dstrain/data/synthetic.py task and run config, the tests' step
counts and task size), repeated for N seeds (seed s: train.seed 42 + s, data.seed s; s = 0 is the tests'
own run) under each kernel variant, in child processes whose environment picks the kernels:

  default   ATEN_CPU_CAPABILITY=default  (torch's scalar kernels)
  avx2      ATEN_CPU_CAPABILITY=avx2
  avx512    ATEN_CPU_CAPABILITY=avx512   (only where the CPU has AVX-512)
  lowered   ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 (with --lowered;
            on an AVX-512 CPU it is an AVX2 machine as far as torch, MKL and oneDNN can tell)

Each variant is checked before it runs: the CPU must have its instructions (torch 2.13 takes
ATEN_CPU_CAPABILITY=avx512 on an AVX2-only CPU and dies of SIGILL in the first kernel), and a child must
report the capability asked for; a variant that fails either is refused with that reason.

Run:  python bench/learning_spread.py [--seeds 5] [--variants default,avx2,avx512] [--lowered]
                                      [--objectives sft,dpo_nll,kto] [--jobs 2] [--out bench/results]
      (--sft-steps / --dpo-steps / --kto-steps / --train-records / --eval-records shrink it for a smoke run)
kto, as in the test, trains on the merged export of the same variant's and seed's sft run, so it needs sft.
Writes learning_spread.json (every run's eval rows, the variants' environments, the machine) under --out and
prints the table recorded in BENCHMARKS.md: per objective, metric and variant the min / median / max over the
seeds, and the worst of all against the tests' bar.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests/ holds the learning tests' settings and the machine facts

from dstrain.config.run import ModelConfig, apply_overrides  # noqa: E402
from dstrain.data.synthetic import TaskSpec, run_config, write_task  # noqa: E402
from dstrain.errors import ConfigError  # noqa: E402
from dstrain.model.build import load_tokenizer  # noqa: E402
from tests.integration.test_learning import (  # noqa: E402
    DPO_BAR,
    DPO_STEPS,
    KTO_BAR,
    KTO_STEPS,
    SFT_BAR,
    SFT_STEPS,
)
from tests.numerics import machine_facts  # noqa: E402

VARIANTS = {
    "default": {"ATEN_CPU_CAPABILITY": "default"},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2"},
    "avx512": {"ATEN_CPU_CAPABILITY": "avx512"},
    "lowered": {
        "ATEN_CPU_CAPABILITY": "avx2",
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
    },
}
# The CPU flags each ATen capability needs (torch's own check for AVX-512: F, BW, VL, DQ).
NEEDS = {"default": set(), "avx2": {"avx2", "fma"}, "avx512": {"avx512f", "avx512bw", "avx512vl", "avx512dq"}}
# The metric each test asserts first, the other it reports, and the bar the test sets today (its asserts).
# kto runs on the merged export of the same variant's and seed's sft run, as the test does.
METRICS = {
    "sft": ("eval_exact_match", "eval_token_f1"),
    "dpo_nll": ("eval_pref_acc", "eval_reward_margin"),
    "kto": ("eval_reward_margin", "eval_loss"),
}
BARS = {
    "sft": ("eval_exact_match", SFT_BAR),
    "dpo_nll": ("eval_pref_acc", DPO_BAR),
    "kto": ("eval_reward_margin", KTO_BAR),
}


@dataclass
class Run:
    variant: str
    seed: int
    objective: str
    steps: int
    wall_s: float
    final: dict[str, float]
    evals: list[dict[str, Any]]


def cpu_flags() -> set[str]:
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []:
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def variant_env(name: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **VARIANTS[name]}


def picked_capability(name: str) -> str:
    """The capability torch picks in a child under the variant's environment."""
    probe = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    proc = subprocess.run(
        [sys.executable, "-c", probe], env=variant_env(name), capture_output=True, text=True, check=True
    )
    return proc.stdout.strip()


def check_variants(names: list[str]) -> dict[str, str]:
    """Each variant's picked capability; exit naming every variant this CPU cannot honour."""
    flags = cpu_flags()
    missing = {name: NEEDS[VARIANTS[name]["ATEN_CPU_CAPABILITY"]] - flags for name in names}
    wrong = [f"{name}: the CPU lacks {' '.join(sorted(lack))}" for name, lack in missing.items() if lack]
    picked = {name: picked_capability(name) for name in names if not missing[name]}
    wrong += [
        f"{name}: asked ATEN_CPU_CAPABILITY={VARIANTS[name]['ATEN_CPU_CAPABILITY']}, torch picked {got}"
        for name, got in picked.items()
        if got.lower() != VARIANTS[name]["ATEN_CPU_CAPABILITY"]
    ]
    if wrong:
        sys.exit("learning_spread: this CPU cannot run " + "; ".join(wrong) + " (leave those variants out)")
    return picked


def merged_sft(work: Path, variant: str, seed: int) -> str:
    """`dstrain export --merge` of this variant's and seed's SFT run: the base (and reference) of its KTO run."""
    out = work / f"sft-{variant}-seed{seed}-merged"
    sft_run = str(work / f"sft-{variant}-seed{seed}")
    cmd = [sys.executable, "-m", "dstrain.cli", "export", sft_run, "--out", str(out), "--merge"]
    proc = subprocess.run(cmd, cwd=work, env=variant_env(variant), capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(
            f"export of sft-{variant}-seed{seed} failed (exit {proc.returncode})\n{proc.stderr[-3000:]}"
        )
    return str(out)


def train(
    work: Path, files: dict[str, Path], variant: str, seed: int, objective: str, steps: int, sets: list[str]
) -> Run:
    """One `dstrain train` of the learning test's config (with `sets`, `--set` overrides: a recipe probe),
    seeded, under the variant's kernels."""
    name = f"{objective}-{variant}-seed{seed}"
    base = merged_sft(work, variant, seed) if objective == "kto" else "builtin:tiny"
    config = run_config(objective, files, work / name, steps, eval_every=max(steps // 5, 1), model_path=base)
    config["train"]["seed"] = 42 + seed
    config["data"]["seed"] = seed
    apply_overrides(config, sets)
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "dstrain.cli", "train", "--config", str(path)],
        cwd=work,
        env=variant_env(variant),
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - started
    if proc.returncode:
        raise RuntimeError(f"{name}: dstrain train failed (exit {proc.returncode})\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (work / name / "metrics.jsonl").open() if line.strip()]
    evals = [row for row in rows if "eval_loss" in row]
    final = {metric: evals[-1][metric] for metric in METRICS[objective]}
    print(f"{name}: {final} ({wall:.0f} s)", flush=True)
    return Run(variant, seed, objective, steps, wall, final, evals)


def spread_table(runs: list[Run], variants: list[str]) -> list[str]:
    """Markdown rows: per objective, metric and variant, min / median / max over the seeds."""
    lines = [
        "| objective | steps | metric | variant | seeds | min | median | max | per seed |",
        "|---" * 9 + "|",
    ]
    for objective, metrics in METRICS.items():
        for metric in metrics:
            for variant in variants:
                chosen = sorted(
                    (r for r in runs if r.objective == objective and r.variant == variant),
                    key=lambda r: r.seed,
                )
                if not chosen:
                    continue
                values = [r.final[metric] for r in chosen]
                per_seed = " ".join(f"{v:.2f}" for v in values)
                lines.append(
                    f"| {objective} | {chosen[0].steps} | {metric} | {variant} | {len(values)} | "
                    f"{min(values):.3f} | {statistics.median(values):.3f} | {max(values):.3f} | {per_seed} |"
                )
    return lines


def worst_against_bars(runs: list[Run]) -> list[str]:
    lines = []
    for objective, (metric, bar) in BARS.items():
        chosen = [r for r in runs if r.objective == objective]
        if chosen:
            worst = min(chosen, key=lambda r: r.final[metric])
            lines.append(
                f"{objective} {metric}: worst {worst.final[metric]:.3f} ({worst.variant}, seed {worst.seed}) "
                f"over {len(chosen)} runs; the test's bar today: {bar}"
            )
    return lines


def task_fields(items: list[str]) -> dict[str, int]:
    """`--task passages=1` -> {"passages": 1}; only TaskSpec's integer fields, named."""
    allowed = {"passages", "codes", "entities"}
    if bad := [item for item in items if "=" not in item]:
        sys.exit(f"learning_spread: --task takes FIELD=VALUE, got {bad}")
    fields = dict(item.split("=", 1) for item in items)
    if set(fields) - allowed:
        sys.exit(f"learning_spread: --task takes {sorted(allowed)}, got {sorted(set(fields) - allowed)}")
    return {key: int(value) for key, value in fields.items()}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    avx512 = not NEEDS["avx512"] - cpu_flags()
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--variants", default="default,avx2" + (",avx512" if avx512 else ""))
    parser.add_argument("--lowered", action="store_true", help="add the lowered variant (see above)")
    parser.add_argument("--objectives", default="sft,dpo_nll,kto")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (one core each)")
    parser.add_argument("--sft-steps", type=int, default=SFT_STEPS)
    parser.add_argument("--dpo-steps", type=int, default=DPO_STEPS)
    parser.add_argument("--kto-steps", type=int, default=KTO_STEPS)
    parser.add_argument("--train-records", type=int, default=SFT_STEPS * 16)  # as the tests' task
    parser.add_argument("--eval-records", type=int, default=100)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override every run's config, as `dstrain train --set` (a recipe probe, e.g. lora.r=64)",
    )
    parser.add_argument(
        "--task",
        dest="task",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="a TaskSpec field of the generated task (passages, codes, entities), e.g. passages=1",
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    variants = [v for v in args.variants.split(",") if v] + (["lowered"] if args.lowered else [])
    unknown = sorted(set(variants) - VARIANTS.keys()) + sorted(
        set(args.objectives.split(",")) - METRICS.keys()
    )
    if unknown:
        sys.exit(f"learning_spread: unknown variant or objective {unknown}")
    picked = check_variants(variants)
    objectives = args.objectives.split(",")
    if "kto" in objectives and "sft" not in objectives:
        sys.exit("learning_spread: kto trains on the sft runs' exports; add sft to --objectives")
    steps = {"sft": args.sft_steps, "dpo_nll": args.dpo_steps, "kto": args.kto_steps}
    # kto after every sft run (its base), the rest in any order
    first = [(v, s, o) for o in objectives if o != "kto" for v in variants for s in range(args.seeds)]
    then = [(v, s, "kto") for v in variants for s in range(args.seeds)] if "kto" in objectives else []
    fields = task_fields(args.task)
    try:
        apply_overrides({}, args.sets)  # a malformed --set fails here, once, not in every run's thread
    except ConfigError as exc:
        sys.exit(f"learning_spread: {exc}")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        spec = TaskSpec(train=args.train_records, eval=args.eval_records, **fields)
        files = write_task(work / "task", load_tokenizer(ModelConfig()), spec)
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            runs = [
                run
                for plan in (first, then)
                for run in pool.map(lambda job: train(work, files, *job, steps[job[2]], args.sets), plan)
            ]
    table = spread_table(runs, variants)
    summary = worst_against_bars(runs)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "command": " ".join(sys.argv),
        "machine": machine_facts(),
        "variants": {v: {"env": VARIANTS[v], "picked": picked[v]} for v in variants},
        "task": {"train": args.train_records, "eval": args.eval_records, **fields},
        "sets": args.sets,
        "wall_s": time.perf_counter() - started,
        "runs": [asdict(r) for r in runs],
        "table": table,
        "summary": summary,
    }
    out = args.out / "learning_spread.json"
    out.write_text(json.dumps(result, indent=1), encoding="utf-8")
    print("\n".join([*table, "", *summary, f"wrote {out} ({result['wall_s']:.0f} s)"]))


if __name__ == "__main__":
    main()
