"""The parts of the GPU benchmark call: their shapes, variants, deadlines and what each needs (gpu_run.py).

Deadlines: a part runs for min(its cap, what is left of the budget); each launch inside it gets its share of
that deadline times 1.5 (so one hung launch cannot starve the rest), always under the part's own deadline,
so the bench's per-launch timeout fires first and the part's deadline is the backstop.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parents[1]
GPU_STEPS, GPU_WARMUP = 60, 20  # 40 timed steps after 20 warm-up; logged at 20, 40, 60 by every framework
SMOKE_STEPS, SMOKE_WARMUP = 24, 8  # the CPU dry run: same code path, fewer steps


def shape(smoke: bool) -> dict[str, list[str]]:
    """The model and the arguments every part shares: toy width on CPU, the ~1.1B TinyLlama shape on GPU."""
    if smoke:
        model = ["--hidden", "64", "--layers", "2", "--heads", "2", "--kv-heads", "1", "--vocab", "3000"]
        dtype, steps, warmup = "fp32", SMOKE_STEPS, SMOKE_WARMUP
    else:
        model = ["--hidden", "2048", "--layers", "22", "--heads", "32", "--kv-heads", "4", "--vocab", "32000"]
        dtype, steps, warmup = "bf16", GPU_STEPS, GPU_WARMUP
    common = [
        "--nproc",
        "1",
        "--dtype",
        dtype,
        "--torch-adam",
        "--steps",
        str(steps),
        "--warmup",
        str(warmup),
    ]
    return {
        "model": [*model, "--dtype", dtype, "--max-positions", "8192"],
        "common": common,
        "steps": [str(steps)],
    }


# part -> (script, arguments past the common ones, variants, GPU cap s, CPU dry-run cap s)
PARTS: dict[str, tuple[str, list[str], list[str], int, int]] = {
    "sft": (
        "sft_bench.py",
        ["--records-kind", "long", "--max-seq-len", "2048", "--max-passage-tokens", "1600", "--micro", "4"],
        ["dstrain", "hf", "hf-liger", "trl"],
        210,
        200,
    ),
    "long": (
        "sft_bench.py",
        ["--records-kind", "long8k", "--max-seq-len", "8192", "--max-passage-tokens", "7600", "--micro", "1"],
        ["dstrain", "hf-liger"],
        100,
        110,
    ),
    "dpo": (
        "dpo_bench.py",
        [
            "--passage-words",
            "150",
            "300",
            "--max-seq-len",
            "2048",
            "--max-passage-tokens",
            "1800",
            "--micro",
            "2",
        ],
        ["dstrain", "trl"],
        110,
        130,
    ),
    # the dry run's qlora cap is short on purpose: the part overruns, and its deadline must take it down
    "qlora": (
        "sft_bench.py",
        [
            "--records-kind",
            "long",
            "--max-seq-len",
            "2048",
            "--max-passage-tokens",
            "1600",
            "--micro",
            "4",
            "--load-in-4bit",
        ],
        ["dstrain", "trl"],
        110,
        25,
    ),
    "step": ("gpu/bench_gpu.py", [], [], 90, 60),
}
STEP_SMOKE = ["--layers", "2", "--hidden", "64", "--vocab", "3000", "--seq", "2048", "--micro", "1",
              "--steps", "4", "--warmup", "2", "--heads", "2", "1"]  # fmt: skip
STEP_GPU = ["--steps", "40", "--warmup", "20"]
# what a variant needs besides dstrain's own (deepspeed, dstrain, yaml), and CUDA for Liger's Triton kernels
NEEDS = {
    "hf": ("datasets", "peft"),
    "hf-liger": ("datasets", "peft", "liger_kernel", "triton"),
    "trl": ("trl", "datasets"),
}
PART_NEEDS = ("deepspeed", "dstrain.train", "dstrain.training.loop", "yaml")


@dataclass
class Part:
    """One bounded part of the call."""

    name: str
    script: str
    args: list[str]
    variants: list[str]
    cap: int
    minimum: int
    order: str = "forward"
    dropped: dict[str, str] = field(default_factory=dict)  # variant -> why it is not run
    skipped: str = ""  # why the whole part is not run
    result: Path | None = None

    def launch_timeout(self, deadline: int) -> int:
        share = int(deadline * 1.5 / max(1, len(self.variants)))
        return max(10, min(deadline - 5, share))

    def command(self, python: str, model: Path, work_dir: Path, deadline: int) -> list[str]:
        if self.script.startswith("gpu/"):
            return [python, str(BENCH / self.script), *self.args, "--out", str(self.result)]
        return [
            python,
            str(BENCH / self.script),
            *self.args,
            "--model-dir",
            str(model),
            "--variants",
            *self.variants,
            "--order",
            self.order,
            "--timeout",
            str(self.launch_timeout(deadline)),
            "--work-dir",
            str(work_dir),
            "--out",
            str(self.result),
        ]

    def rows(self) -> dict[str, Any]:
        """variant -> (tokens/s, pairs/s, peak GB) as text, or "failed", from the part's results JSON so far."""
        if self.result is None or not self.result.is_file():
            return {}
        data = json.loads(self.result.read_text(encoding="utf-8"))
        if "runs" in data and data["runs"] and "variant" in data["runs"][0]:  # bench_gpu.py
            return {"(in-process)": ("hf " + f"{data['runs'][0]['tokens_per_s']:,.0f}" + ", dstrain "
                                     + f"{data['runs'][1]['tokens_per_s']:,.0f}", "", "")}  # fmt: skip
        rows: dict[str, Any] = {}
        for run in data.get("runs", []):
            for name, res in run.get("results", {}).items():
                if res is None:
                    rows[name] = "failed"
                    continue
                pairs = f"{res['pairs'] / res['seconds']:.2f}" if self.script == "dpo_bench.py" else ""
                peak = f"{res['peak_mem_gb']:.1f}" if res.get("peak_mem_gb") else ""
                rows[name] = (f"{res['tokens'] / res['seconds']:,.0f}", pairs, peak)
        return rows


def missing(found: dict[str, str], names: tuple[str, ...]) -> list[str]:
    return [name for name in names if str(found.get(name, "MISSING")).startswith("MISSING")]


def plan(names: list[str], found: dict[str, str], smoke: bool) -> list[Part]:
    """The parts asked for, in order, each with the variants that can run here (and why others cannot)."""
    common = shape(smoke)["common"]
    steps = int(shape(smoke)["steps"][0])
    parts = []
    for index, name in enumerate(names):
        if name not in PARTS:
            part = Part(name, "", [], [], 0, 0, skipped=f"skipped: unknown part (known: {', '.join(PARTS)})")
            parts.append(part)
            continue
        script, args, variants, gpu_cap, cpu_cap = PARTS[name]
        size = ["--records", str(steps * 4)] if script == "sft_bench.py" else ["--pairs", str(steps * 2)]
        extra = (STEP_SMOKE if smoke else STEP_GPU) if name == "step" else [*common, *args, *size]
        part = Part(name, script, extra, list(variants), cpu_cap if smoke else gpu_cap, 20 if smoke else 45)
        part.order = "reverse" if index % 2 else "forward"  # no framework always runs first
        gaps = missing(found, ("torch", *PART_NEEDS))
        if name == "qlora":
            gaps += missing(found, ("bitsandbytes",))
        if gaps:
            part.skipped = f"skipped: {', '.join(gaps)} missing"
        for variant in list(part.variants):
            lacking = missing(found, NEEDS.get(variant, ()))
            if variant == "hf-liger" and not found.get("cuda"):
                lacking.append("CUDA (Liger's Triton kernels)")
            if lacking:
                part.variants.remove(variant)
                part.dropped[variant] = f"needs {', '.join(lacking)}"
        parts.append(part)
    return parts
