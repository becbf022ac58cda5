"""Shared parts of the framework benchmarks (sft_bench, dpo_bench, loop_bench, gpu/run.sh).

One place for the fully resolved ZeRO JSON every framework gets (so no framework fills an "auto" its own way),
launching one `deepspeed` job and reading back its throughput. The generated RAG workloads are in
bench_workload.py, the random-init model dir in bench_model.py, the machine line and tables in bench_report.py.

Every framework run measures the same thing: wall time from the end of warm-up step `warmup` to the end of the
last step (rank 0's clock), and the non-padding tokens (attention-mask ones) / preference pairs of the batches
trained in those steps, summed over ranks.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench_deadline import kill_tree  # noqa: E402  (after the path setup)
from bench_model import write_model  # noqa: E402
from bench_workload import Workload, log_every  # noqa: E402

# ------------------------------------------------------------------------------------------- ZeRO JSON


def resolved_ds_config(
    micro: int,
    world: int,
    steps: int,
    lr: float,
    stage: int = 2,
    bf16: bool = False,
    accumulation: int = 1,
    torch_adam: bool = False,
) -> dict[str, Any]:
    """dstrain's ds_configs/zero2.json (or zero3) with every "auto" filled the way dstrain fills it.

    Handed unchanged to every framework: HF's integration checks each explicit value against its
    TrainingArguments (and raises on a mismatch), so the workers set matching arguments.
    """
    name = "zero3.json" if stage == 3 else "zero2.json"
    ds = json.loads((REPO / "dstrain" / "ds_configs" / name).read_text(encoding="utf-8"))
    ds["train_micro_batch_size_per_gpu"] = micro
    ds["gradient_accumulation_steps"] = accumulation
    ds["train_batch_size"] = micro * accumulation * world
    ds["bf16"] = {"enabled": bf16}
    ds["fp16"] = {"enabled": False}
    ds["scheduler"]["params"].update(
        warmup_max_lr=lr,
        warmup_num_steps=warmup_steps(steps),
        total_num_steps=steps,
    )
    ds["optimizer"]["params"]["lr"] = lr
    if (
        torch_adam
    ):  # torch's AdamW instead of FusedAdam, whose CUDA op needs a JIT build (nvcc) on the GPU box
        ds["optimizer"]["params"]["torch_adam"] = True
    zero = ds["zero_optimization"]
    for key, value in list(zero.items()):
        if value == "auto":  # ZeRO-3 bucket sizes: dstrain derives them from hidden size; fixed here
            zero[key] = {"stage3_prefetch_bucket_size": 5e7, "stage3_param_persistence_threshold": 1e5}.get(
                key, int(5e7)
            )
    return ds


def warmup_steps(steps: int) -> int:
    """dstrain's "auto" warmup: 5% of the steps, at least one."""
    return max(1, math.ceil(0.05 * steps))


# ------------------------------------------------------------------------------------------- launching


def child_env(threads: int = 1, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a launched job: the venv's `deepspeed` on PATH, one intra-op thread per rank."""
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(threads),
        PYTHONUNBUFFERED="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}".rstrip(os.pathsep),
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HUB_OFFLINE="1",
        WANDB_DISABLED="true",
        DISABLE_MLFLOW_INTEGRATION="TRUE",
    )
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env.update(extra or {})
    return env


def deepspeed_launch(args: list[str], nproc: int) -> tuple[list[str], dict[str, str]]:
    """(command, extra environment) of one launch of the script/module in `args`.

    Several ranks: `deepspeed --num_gpus N --master_port FREE ARGS` through this Python (`-m
    deepspeed.launcher.runner`, what the `deepspeed` script runs), which works where DeepSpeed was
    pip-installed with --target, without a `deepspeed` on PATH (the GPU image). One rank: the rank itself, with
    the variables the launcher would set: two fewer Python start-ups (runner, launch.py) per launch, which is
    most of a part's minute on the GPU; the measured steps are the same.
    """
    from dstrain.distributed.env import free_port

    port = str(free_port())
    if nproc == 1:
        target = ["-m", args[1], *args[2:]] if args[0] == "--module" else args
        env = {
            "RANK": "0",
            "LOCAL_RANK": "0",
            "WORLD_SIZE": "1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
        }
        return [sys.executable, *target], env
    runner = [sys.executable, "-m", "deepspeed.launcher.runner"]
    return [*runner, "--num_gpus", str(nproc), "--master_port", port, *args], {}


def run_job(
    cmd: list[str], log: Path, timeout: int, threads: int = 1, env: dict[str, str] | None = None
) -> None:
    """Run one launch to its end, output to `log`; on timeout kill its whole process tree (ranks too)."""
    with log.open("w", encoding="utf-8") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            env=child_env(threads, env),
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            kill_tree(proc.pid)  # ranks that left the group
            proc.wait()
            raise RuntimeError(f"timed out after {timeout} s; log: {log}") from None
    if code:
        tail = "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-40:])
        raise RuntimeError(f"exit {code}; log: {log}\n{tail}")


@dataclass
class Throughput:
    """One framework run: tokens / pairs trained after warm-up, over the wall time of those steps."""

    name: str
    seconds: float
    tokens: int
    pairs: int = 0
    steps: int = 0
    peak_mem_gb: float | None = None
    loss: float | None = None
    notes: str = ""
    first_step_s: float | None = None  # process start to the end of optimizer step 1 (rank 0)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def pairs_per_s(self) -> float:
        return self.pairs / self.seconds


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def dstrain_throughput(name: str, run_dir: Path, warmup: int) -> Throughput:
    """From metrics.jsonl: steps after `warmup` (must be a logged step, see dstrain_overrides)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [row for row in rows if "tokens_per_s" in row]
    base = next(row for row in rows if row["step"] == warmup)
    later = [row for row in rows if row["step"] > warmup]
    seconds, previous = 0.0, warmup
    for row in later:  # step_time_s is the mean over the steps since the previous log
        seconds += row["step_time_s"] * (row["step"] - previous)
        previous = row["step"]
    last = later[-1]
    pairs = last["samples"] - base["samples"]
    return Throughput(
        name=name,
        seconds=seconds,
        tokens=last["tokens"] - base["tokens"],
        pairs=pairs,
        steps=last["step"] - warmup,
        # on CPU dstrain's mem_gb is the process RSS, which the baselines do not report: left out
        peak_mem_gb=(max((row.get("mem_gb") or 0.0) for row in rows) or None) if cuda_available() else None,
        loss=last.get("loss"),
        first_step_s=next((row["startup_total_s"] for row in rows if "startup_total_s" in row), None),
    )


def dstrain_config(work: Workload, run_dir: Path, objective: str, options: dict[str, Any]) -> dict[str, Any]:
    """A run YAML (as a dict) that makes dstrain train `work`; `options` ("section.key": value) on top.

    Written in full rather than as `--set`s on the demo config: the demo's eval set would add an eval.
    """
    fmt = "preference" if objective != "sft" else "sft-rag"
    raw: dict[str, Any] = {
        "model": {
            "path": work.model,
            "dtype": work.dtype,
            "gradient_checkpointing": work.gradient_checkpointing,
            "load_in_4bit": work.load_in_4bit,
        },
        "lora": {
            "r": work.lora_r,
            "alpha": work.lora_alpha,
            "dropout": work.lora_dropout,
            "target_modules": "all-linear",
        },
        "data": {
            "train": [work.data],
            "format": fmt,
            "max_seq_len": work.max_seq_len,
            "max_passage_tokens": work.max_passage_tokens,
        },
        "objective": {"name": objective, "beta": work.beta},
        "train": {
            "max_steps": work.steps,
            "log_every": log_every(work),
            "eval_every": 0,
            "save_every": 0,
            "memory_check": "off",
        },
        "ds_config": work.ds_config,
        "output_dir": str(run_dir),
    }
    if not work.load_in_4bit:
        del raw["model"]["load_in_4bit"]  # the key exists only once QLoRA support is in
    for key, value in options.items():
        section, name = key.split(".", 1)
        raw.setdefault(section, {})[name] = value
    return raw


def run_dstrain(
    name: str,
    work: Workload,
    work_dir: Path,
    objective: str,
    options: dict[str, Any],
    nproc: int,
    timeout: int,
) -> Throughput:
    """One `deepspeed --num_gpus N --module dstrain.train --config RUN.yaml` launch."""
    import yaml

    run_dir = work_dir / name
    shutil.rmtree(run_dir, ignore_errors=True)
    config = work_dir / f"{name}.yaml"
    config.write_text(yaml.safe_dump(dstrain_config(work, run_dir, objective, options)), encoding="utf-8")
    cmd, env = deepspeed_launch(["--module", "dstrain.train", "--config", str(config)], nproc)
    run_job(cmd, work_dir / f"{name}.log", timeout, env=env)
    return dstrain_throughput(name, run_dir, work.warmup)


def run_worker(
    name: str, work: Workload, work_dir: Path, mode: str, options: dict[str, Any], nproc: int, timeout: int
) -> Throughput:
    """One `deepspeed --num_gpus N bench/hf_worker.py` launch (HF Trainer / TRL); reads its result JSON."""
    spec = work_dir / f"{name}.workload.json"
    work.save(spec)
    result = work_dir / f"{name}.result.json"
    result.unlink(missing_ok=True)
    cmd, env = deepspeed_launch(
        [
            str(REPO / "bench" / "hf_worker.py"),
            "--mode",
            mode,
            "--workload",
            str(spec),
            "--options",
            json.dumps(options),
            "--result",
            str(result),
            "--output-dir",
            str(work_dir / name),
        ],
        nproc,
    )
    run_job(cmd, work_dir / f"{name}.log", timeout, env=env)
    data = json.loads(result.read_text(encoding="utf-8"))
    return Throughput(name=name, **data)


def run_variant(
    name: str,
    runner: str,
    work: Workload,
    work_dir: Path,
    options: dict[str, Any],
    nproc: int,
    timeout: int,
    objective: str = "sft",
) -> Throughput | None:
    """One row of a benchmark; a failure is printed and gives None, so the other rows still run."""
    started = time.perf_counter()
    try:
        if runner == "dstrain":
            result = run_dstrain(name, work, work_dir, objective, options, nproc, timeout)
        else:
            result = run_worker(name, work, work_dir, runner, options, nproc, timeout)
    except (RuntimeError, OSError, StopIteration, KeyError, ValueError) as exc:
        print(f"[{name}] FAILED after {time.perf_counter() - started:.0f} s: {exc}", flush=True)
        return None
    pairs = f", {result.pairs_per_s:.2f} pairs/s" if objective != "sft" or runner.startswith("dpo") else ""
    print(
        f"[{name}] {result.tokens_per_s:,.0f} tokens/s{pairs} over {result.steps} "
        f"steps ({result.seconds:.1f} s measured, {time.perf_counter() - started:.0f} s launch to exit)",
        flush=True,
    )
    return result


def prepare_workload(
    vocab: int, args: Any, work_dir: Path, data: Path, items: int, **extra: Any
) -> tuple[Path, Workload, int]:
    """(model dir, Workload, global batch) of one vocab size: the model (or `--model-dir`), the resolved ZeRO
    JSON and the run shape from a bench's common arguments; `items` records or pairs make one epoch."""
    model = args.model_dir or write_model(
        work_dir / f"model-{args.shape}-v{vocab}", args.shape, vocab, args.hidden, args.layers, args.dtype
    )
    global_batch = args.micro * args.nproc
    steps = args.steps or items // global_batch
    ds = resolved_ds_config(
        args.micro, args.nproc, steps, lr=2e-4, bf16=args.dtype == "bf16", torch_adam=args.torch_adam
    )
    ds_path = work_dir / f"ds-v{vocab}.json"
    ds_path.write_text(json.dumps(ds, indent=2) + "\n")
    work = Workload(
        data=str(data),
        model=str(model),
        ds_config=str(ds_path),
        steps=steps,
        warmup=args.warmup,
        micro=args.micro,
        max_seq_len=args.max_seq_len,
        max_passage_tokens=args.max_passage_tokens,
        dtype=args.dtype,
        gradient_checkpointing=args.gradient_checkpointing,
        load_in_4bit=args.load_in_4bit,
        **extra,
    )
    return Path(model), work, global_batch


def add_run_arguments(parser: Any, variants: list[str]) -> None:
    """The options sft_bench and dpo_bench share: precision, QLoRA, optimizer, variants, paths, timeout."""
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument(
        "--load-in-4bit", action="store_true", help="QLoRA: 4-bit NF4 base in every framework"
    )
    parser.add_argument(
        "--torch-adam",
        action="store_true",
        help="torch's AdamW in the ZeRO JSON (GPU without nvcc: no FusedAdam JIT build)",
    )
    parser.add_argument("--variants", nargs="+", default=variants, choices=variants)
    parser.add_argument(
        "--order",
        choices=["forward", "reverse"],
        default="forward",
        help="run the variants as listed, or last first (alternate between runs: no framework always first)",
    )
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        help="use this HF model dir instead of generating one (then --vocab is ignored)",
    )
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per launch before it is killed")
    parser.add_argument("--work-dir", type=Path, default=None, help="keep data, model, logs here")
    parser.add_argument("--out", type=Path, default=None, help="write all results as JSON here")
