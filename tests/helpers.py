"""Test helpers: small run configs on the bundled data, and real subprocess launches as users run them."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import yaml

from dstrain.config.demo import asset
from dstrain.distributed.env import free_port

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def subset(src: str, dst: Path, n: int) -> Path:
    lines = Path(src).read_text(encoding="utf-8").splitlines()[:n]
    dst.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return dst


def make_small_data(tmp_path: Path) -> dict[str, Path]:
    """64 train and 16 eval records of the bundled sft-rag set."""
    return {
        "train": subset(asset("data", "sft_rag_train.jsonl"), tmp_path / "train.jsonl", 64),
        "eval": subset(asset("data", "sft_rag_eval.jsonl"), tmp_path / "eval.jsonl", 16),
    }


def write_config(tmp_path: Path, files: dict[str, Path], name: str = "run", **sections: dict) -> Path:
    """A run YAML on `files` with output under tmp_path/name; `sections` update the defaults per section."""
    raw = {
        "model": {"path": "builtin:tiny", "dtype": "fp32"},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {
            "train": [str(files["train"])],
            "eval": [str(files["eval"])],
            "format": "sft-rag",
            "max_seq_len": 256,
            "max_passage_tokens": 160,
        },
        # plot off: 1.5 s of matplotlib per run, some 300 runs in the suite; the tests of the plot turn it on
        "train": {
            "max_steps": 4,
            "log_every": 1,
            "save_every": 2,
            "keep_last": 5,
            "global_batch_size": 8,
            "plot": False,
        },
        "ds_config": "ds_configs/zero2.json",
        "output_dir": str(tmp_path / name),
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            raw.setdefault(key, {}).update(value)
        else:
            raw[key] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def run(
    cmd: list[str], cwd: Path, timeout: int = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run a launch to its end (in `env`, default `child_env()`); on timeout kill its whole process group,
    not just the launcher.

    A launcher killed alone leaves its ranks running, orphaned: they hold ports, shared memory and build
    locks that later tests then trip over.
    """
    with subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env if env is not None else child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            raise subprocess.TimeoutExpired(cmd, timeout, out, err) from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def run_together(
    cmds: dict[str, list[str]], cwd: Path, envs: dict[str, dict[str, str]] | None = None, timeout: int = 600
) -> dict[str, subprocess.CompletedProcess]:
    """Run one-process commands side by side (one core each on the 2-core CI machine: the wall time of
    one), each in its env (default `child_env()`); output goes to files, so no pipe fills up meanwhile."""
    procs = {}
    for name, cmd in cmds.items():
        with (cwd / f"{name}.out").open("w") as out, (cwd / f"{name}.err").open("w") as err:
            env = (envs or {}).get(name) or child_env()
            procs[name] = subprocess.Popen(
                cmd, cwd=cwd, env=env, stdout=out, stderr=err, start_new_session=True
            )
    try:
        for proc in procs.values():
            proc.wait(timeout=timeout)
    finally:
        for proc in procs.values():  # past the hang guard: the whole group, ranks included
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
    return {
        name: subprocess.CompletedProcess(
            proc.args, proc.wait(), (cwd / f"{name}.out").read_text(), (cwd / f"{name}.err").read_text()
        )
        for name, proc in procs.items()
    }


def check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-6000:]}"
    )
    return proc


def assert_clean_failure(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """Non-zero exit with exactly one `error:` message holding every needle, and no traceback."""
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    assert proc.stderr.count("error:") == 1, proc.stderr
    for needle in needles:
        assert needle in proc.stderr, f"{needle!r} not in:\n{proc.stderr}"


def dstrain(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return run([str(VENV_BIN / "dstrain"), *args], cwd)


def train_single(config: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """One local process: `python -m dstrain.train`."""
    return run([sys.executable, "-m", "dstrain.train", "--config", str(config), *args], cwd)


def deepspeed_cmd(*args: str, nproc: int = 2) -> list[str]:
    """`deepspeed --num_gpus N --master_port FREE ARGS...`: the launcher line, on a port nobody holds."""
    return [str(VENV_BIN / "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(free_port()), *args]


def train_deepspeed(
    config: Path, *args: str, cwd: Path, nproc: int = 2, module: str = "dstrain.train"
) -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus N --module dstrain.train ...`, exactly as a user starts it (gloo on CPU)."""
    return run(deepspeed_cmd("--module", module, "--config", str(config), *args, nproc=nproc), cwd)


def torchrun_cmd(*args: str, nproc: int = 2) -> list[str]:
    """`torchrun --nproc_per_node N --master_port FREE ARGS...` (ARGS: `-m MODULE ...` or `SCRIPT ...`), for
    tests whose subject is what the ranks compute, not how they were started.

    torchrun is one process that imports torch (3 s); the deepspeed launcher is two that import deepspeed
    (runner and launch.py, 6-7 s each), so each of these launches starts its ranks about 11 s sooner. The
    deepspeed launcher keeps the tests about launching itself: signals, failures and frozen ranks, the
    golden runs, two nodes, Slurm, and every `dstrain train/resume --num-gpus`.
    """
    return [
        str(VENV_BIN / "torchrun"),
        "--nproc_per_node",
        str(nproc),
        "--master_port",
        str(free_port()),
        *args,
    ]


def train_ranks(
    config: Path, *args: str, cwd: Path, nproc: int = 2, module: str = "dstrain.train"
) -> subprocess.CompletedProcess:
    """N ranks of `python -m dstrain.train --config CONFIG ...` started by torchrun (`torchrun_cmd`)."""
    return run(torchrun_cmd("-m", module, "--config", str(config), *args, nproc=nproc), cwd)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def train_losses(run_dir: Path) -> list[float]:
    return [row["loss"] for row in metrics(run_dir) if "loss" in row]


def ulps_at_largest(reference, n: float, dtype=None) -> float:
    """`n` units in the last place of `reference`'s largest |value|, in `dtype` (default: its own).

    The tolerance for "the same numbers, computed in another order": rounding error grows with the
    magnitude of what is summed, not with each element (an entry near zero that came out of cancelling
    terms carries the error of those terms), so a fixed absolute bound is too tight for large values and
    meaningless for tiny ones. torch is imported here, not at the top: conftest imports this module.
    """
    import math

    import torch

    largest = reference.detach().abs().max().item()
    if largest == 0 or not math.isfinite(largest):
        return 0.0
    return n * torch.finfo(dtype or reference.dtype).eps * 2.0 ** math.floor(math.log2(largest))


def lora_model(lora_b_std: float = 0.02):
    """The bundled tiny model with LoRA (no dropout), seeded, its B matrices drawn from N(0, std): fresh B
    matrices are zero, which would make the adapter a no-op in any comparison (and policy = reference)."""
    import torch

    from dstrain.config.run import LoraConfig, ModelConfig
    from dstrain.model.build import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(), LoraConfig(dropout=0.0), zero_stage=2)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, lora_b_std, generator=torch.Generator().manual_seed(len(name)))
    return model


def assert_adapter_logits(logits, expected, tolerance: float) -> None:
    """The reloaded adapter's logits are the training model's, within `tolerance` (see ulps_at_largest)."""
    import torch

    torch.testing.assert_close(
        logits,
        expected,
        rtol=0,
        atol=tolerance,
        msg=lambda m: f"adapter logits differ from the training model's: {m}",
    )
