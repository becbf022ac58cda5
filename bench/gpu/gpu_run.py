"""The GPU benchmark call after the wheel install (bench/gpu/run.sh runs it): preflight, model, then each part
under its own hard deadline that kills its whole process tree (bench_deadline.py), results kept as each row
and part finishes, every launch log packed, and a summary table printed last (and appended to setup.txt).

Parts (PARTS, in this order by default; each skipped with its reason when what it needs is missing):
  sft    SFT tokens/s at seq 2048: dstrain, HF Trainer, HF Trainer + Liger (use_liger_kernel), TRL SFTTrainer
  long   SFT at seq 8k (micro 1): dstrain and HF Trainer + Liger
  dpo    DPO pairs/s: dstrain (shared prompt) and TRL DPOTrainer
  qlora  the sft part with a 4-bit NF4 base: dstrain and TRL
  step   bench/gpu/bench_gpu.py, in-process step cost (opt-in: PARTS="sft step")
The variants run in alternating order from part to part; each launch trains WARMUP + TIMED steps and is
timed over the last TIMED, every framework logging on the same steps.

Environment: SMOKE=1 (toy width on CPU, same path; one part made to overrun its deadline on purpose), OUT,
WORK, PARTS, BUDGET (seconds for the whole call, counted from BENCH_STARTED, which run.sh sets).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path[:0] = [str(HERE), str(HERE.parent)]

import gpu_out  # noqa: E402  (after the path setup)
from bench_deadline import Outcome, run_with_deadline  # noqa: E402
from gpu_plan import Part, plan, shape  # noqa: E402

PREFLIGHT = """
import importlib, json, sys
found = {}
for name in sys.argv[2:]:
    try:
        found[name] = getattr(importlib.import_module(name), "__version__", "ok")
    except Exception as exc:  # a broken install reads as a missing one: what needs it is not run
        found[name] = f"MISSING {type(exc).__name__}: {str(exc)[:160]}"
import torch
found["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else ""
json.dump(found, open(sys.argv[1], "w"), indent=1)
"""
MODULES = ("torch", "transformers", "peft", "accelerate", "deepspeed", "trl", "datasets", "bitsandbytes",
           "liger_kernel", "triton", "yaml", "psutil", "dstrain.train", "dstrain.training.loop")  # fmt: skip


@dataclass
class Run:
    """The call's state: where things go, the clock, and what happened to each part."""

    out: Path
    work: Path
    smoke: bool
    budget: int
    started: float
    lines: list[str] = field(default_factory=list)

    def left(self) -> float:
        return self.budget - (time.time() - self.started)

    def note(self, line: str) -> None:
        """Print a line and keep it in $OUT/setup.txt (rewritten whole: one file, always current)."""
        print(line, flush=True)
        self.lines.append(line)
        (self.out / gpu_out.SETUP).write_text("\n".join(self.lines) + "\n", encoding="utf-8")


def bounded(run: Run, name: str, cmd: list[str], seconds: float) -> Outcome:
    outcome = run_with_deadline(cmd, seconds, run.work / "logs" / f"{name}.log", cwd=REPO)
    extra = f"; {len(outcome.swept)} process(es) left running, killed" if outcome.swept else ""
    if outcome.survivors:
        extra += f"; STILL RUNNING after kill: {outcome.survivors}"
    run.note(f"== {name}: {outcome.status} ({outcome.seconds:.0f} s){extra}")
    return outcome


def preflight(run: Run) -> dict[str, str]:
    found_path = run.work / "preflight.json"
    found_path.unlink(missing_ok=True)
    bounded(run, "preflight", [sys.executable, "-c", PREFLIGHT, str(found_path), *MODULES], 90)
    found = json.loads(found_path.read_text()) if found_path.is_file() else {}
    for name in MODULES:
        run.note(f"   {name}: {found.get(name, 'MISSING (preflight did not finish)')}")
    run.note(f"   GPU: {found.get('cuda') or 'none (CPU)'}")
    return found


def build_model(run: Run) -> Path | None:
    from bench_model import model_ready

    model = run.work / "model"
    cmd = [sys.executable, str(HERE / "make_model.py"), "--out", str(model), *shape(run.smoke)["model"]]
    bounded(run, "model", cmd, 150)
    return model if model_ready(model) else None


def run_part(run: Run, part: Part, index: int, model: Path) -> Outcome | None:
    """One part under min(its cap, what is left of the budget); None when too little is left to start it."""
    deadline = min(part.cap, run.left() - 15)  # 15 s kept for packing and the summary
    if deadline < part.minimum:
        part.skipped = f"skipped: {run.left():.0f} s of the budget left, it needs {part.minimum} s"
        run.note(f"== {part.name} {part.skipped}")
        return None
    part.result = gpu_out.result_path(part.name, index, run.out, run.work)
    part.result.parent.mkdir(parents=True, exist_ok=True)
    cmd = part.command(sys.executable, model, run.work / part.name, int(deadline))
    run.note(f"== {part.name}: {' '.join(part.variants) or 'in-process'}, deadline {deadline:.0f} s")
    outcome = bounded(run, part.name, cmd, deadline)
    gpu_out.pack_logs(run.work, run.out)  # logs so far, should the call itself be cut next
    return outcome


def summary(parts: list[Part], outcomes: dict[str, Outcome | None]) -> list[str]:
    """One row per variant: what ran (its throughput), what failed, what was cut or never started."""
    lines = ["| part | variant | status | tokens/s | pairs/s | peak GB |", "|---|---|---|---|---|---|"]
    for part in parts:
        outcome = outcomes.get(part.name)
        rows = part.rows()
        status = part.skipped or (outcome.status if outcome else "not run")
        for variant in part.variants or ["(in-process)"]:
            row = rows.get(variant)
            if row is None:
                lines.append(f"| {part.name} | {variant} | {status}: no result |  |  |  |")
            elif row == "failed":
                lines.append(
                    f"| {part.name} | {variant} | failed (its log is in {gpu_out.TARBALL}) |  |  |  |"
                )
            else:
                lines.append(f"| {part.name} | {variant} | ran | {row[0]} | {row[1]} | {row[2]} |")
        for variant, reason in part.dropped.items():
            lines.append(f"| {part.name} | {variant} | not run: {reason} |  |  |  |")
    return lines


def main() -> int:
    # the call's backstop `timeout` sends SIGTERM: exit through run_with_deadline, which kills the part's tree
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))
    smoke = os.environ.get("SMOKE", "0") == "1"
    run = Run(
        out=Path(os.environ.get("OUT", "/tmp/out")),
        work=Path(os.environ.get("WORK", "/tmp/gpu-bench-work")),
        smoke=smoke,
        budget=int(os.environ.get("BUDGET", "480" if smoke else "540")),
        started=float(os.environ.get("BENCH_STARTED", time.time())),
    )
    run.out.mkdir(parents=True, exist_ok=True)
    setup = run.out / gpu_out.SETUP
    run.lines = setup.read_text(encoding="utf-8").splitlines() if setup.is_file() else []
    found = preflight(run)
    parts = plan(os.environ.get("PARTS", "sft long dpo qlora").split(), found, smoke)
    outcomes: dict[str, Outcome | None] = {}
    model = build_model(run) if any(not p.skipped for p in parts) else None
    if model is None:
        run.note("== model: not built (see logs/model.log in the tarball): no part can run")
    try:
        for index, part in enumerate(parts):
            if part.skipped:
                run.note(f"== {part.name} {part.skipped}")
            elif model is not None:
                outcomes[part.name] = run_part(run, part, index, model)
    except SystemExit:  # SIGTERM from the call's backstop: the part's tree is already killed; report
        run.note("== cut by the whole call's deadline (SIGTERM)")
    for stale in run.out.glob("*.partial"):
        stale.unlink()
    gpu_out.pack_logs(run.work, run.out)
    run.note(f"\n== summary ({time.time() - run.started:.0f} s of the {run.budget} s budget)")
    for line in summary(parts, outcomes):
        run.note(line)
    problems = gpu_out.check_out(run.out)
    files = sorted(p.name for p in run.out.iterdir())
    run.note(
        f"OUT: {len(files)} files ({', '.join(files)})" + (f"; PROBLEMS: {problems}" if problems else "")
    )
    return 3 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
