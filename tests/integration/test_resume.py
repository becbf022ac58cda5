"""Exact resume, graceful stop and crash safety with real processes on one rank.

The reference is one uninterrupted run. Every other run here is stopped or killed (SIGTERM, SIGKILL at random
points, SIGKILL in the middle of a save) and resumed with `dstrain resume`; its final adapter, optimizer
state and every logged loss must equal the reference bit for bit (CPU, fp32). LoRA dropout is on, so the
restored RNG streams matter.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import (
    REPO,
    check,
    child_env,
    dstrain,
    make_small_data,
    metrics,
    train_single,
    write_config,
)

STEPS = 40
TRAIN = {"max_steps": STEPS, "log_every": 1, "save_every": 10, "keep_last": 10, "global_batch_size": 8}
LORA = {"r": 8, "alpha": 16, "dropout": 0.1}
FINAL = f"checkpoints/step-{STEPS:08d}"
# Each random trial is a killed run plus its resume, about one whole 40-step run plus a start-up (~50 s in the
# suite on 2 cores, beside the other worker). Three random trials (beside the three fixed ones above) keep the
# suite's time budget; DSTRAIN_FAULT_TRIALS=20 gives the longer soak (BENCHMARKS.md, "Fault trials").
FAULT_TRIALS = int(os.environ.get("DSTRAIN_FAULT_TRIALS", "3"))


def config(tmp: Path, data: dict, name: str, **train: int) -> Path:
    return write_config(tmp, data, name, lora=LORA, train={**TRAIN, **train})


def start(cfg: Path, cwd: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "dstrain.train", "--config", str(cfg)]
    return subprocess.Popen(
        cmd, cwd=cwd, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def resume(run_dir: Path, cwd: Path, *extra: str) -> subprocess.CompletedProcess:
    return dstrain("resume", str(run_dir), *extra, cwd=cwd)


def logged_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = [json.loads(line).get("step", 0) for line in path.read_text().splitlines() if line.endswith("}")]
    return max(steps, default=0)


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 300.0, poll: float = 0.02) -> bool:
    """Poll until predicate() holds; False if the process ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(poll)
    raise AssertionError("timed out waiting for the training process")


def train_losses(run_dir: Path) -> dict[int, float]:
    rows = [r for r in metrics(run_dir) if "loss" in r]
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), f"a step was logged twice: {steps}"
    return {r["step"]: r["loss"] for r in rows}


def assert_same_final_state(run_dir: Path, reference: Path) -> None:
    for name in ("adapter_model.safetensors", "optimizer.safetensors"):
        got, want = load_file(str(run_dir / FINAL / name)), load_file(str(reference / FINAL / name))
        assert got.keys() == want.keys()
        differing = [k for k in want if not torch.equal(got[k], want[k])]
        assert not differing, f"{name}: {len(differing)} tensors differ, e.g. {differing[:3]}"
    assert train_losses(run_dir) == train_losses(reference)  # every step, exactly once, bitwise
    state = json.loads((run_dir / FINAL / "trainer_state.json").read_text())
    want = json.loads((reference / FINAL / "trainer_state.json").read_text())
    for key in ("step", "epoch", "cursor", "samples", "tokens"):
        assert state[key] == want[key], key


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("resume")


@pytest.fixture(scope="module")
def data(work: Path) -> dict:
    return make_small_data(work)


@pytest.fixture(scope="module")
def reference(work: Path, data: dict) -> Path:
    """The uninterrupted run. It saves less often than the runs below: saving must not change training."""
    cfg = config(work, data, "reference", save_every=20)
    proc = start(cfg, REPO)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-4000:]
    return work / "reference"


def test_resume_from_a_middle_checkpoint_is_bitwise_exact(work: Path, data: dict, reference: Path):
    run = work / "copy"
    shutil.copytree(reference, run)
    shutil.rmtree(run / FINAL)
    (run / "checkpoints" / "latest").write_text("step-00000020\n")
    proc = check(resume(run, REPO))
    assert "resuming from" in proc.stdout and "at step 20" in proc.stdout
    assert_same_final_state(run, reference)


def test_no_pickle_is_written_or_loaded(work: Path, reference: Path):
    """Every checkpoint file is safetensors, JSON or YAML; a resume with pickle.load and torch.load disabled
    (the two ways a pickle is read from a file) still resumes exactly."""
    for path in (reference / "checkpoints").rglob("*"):
        if path.is_file():
            assert path.suffix in {".safetensors", ".json", ".yaml"} or path.name == "latest", path
            head = path.read_bytes()[:2]
            assert head[:1] != b"\x80" and head != b"PK", f"{path} looks like a pickle / torch.save zip"
    assert not (reference / "loss.png").exists()  # train.plot: false (tests/helpers.write_config) draws none
    guard = work / "no_pickle"
    guard.mkdir(exist_ok=True)
    (guard / "sitecustomize.py").write_text(
        "import pickle, torch\n"
        "def _refuse(*a, **k):\n"
        "    raise RuntimeError('pickle load attempted during resume')\n"
        "pickle.load = torch.load = _refuse\n"
    )
    run = work / "no_pickle_run"
    shutil.copytree(reference, run)
    shutil.rmtree(run / FINAL)
    env = {**child_env(), "PYTHONPATH": f"{guard}{os.pathsep}{REPO}"}
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "dstrain"), "resume", str(run)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    check(proc)
    assert_same_final_state(run, reference)


def test_sigterm_finishes_the_step_saves_and_exits_zero(work: Path, data: dict, reference: Path):
    cfg = config(work, data, "sigterm")
    run = work / "sigterm"
    proc = start(cfg, REPO)
    assert wait_for(lambda: logged_steps(run) >= 3, proc), proc.communicate()[1][-3000:]
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "SIGTERM received" in err and "stopped at step" in out
    stopped = json.loads((run / "checkpoints" / "latest").read_text().strip().join(['"', '"']))
    step = int(stopped.split("-")[1])
    assert 3 <= step < STEPS
    state = json.loads((run / "checkpoints" / stopped / "trainer_state.json").read_text())
    assert state["step"] == step and state["samples"] == step * 8
    check(resume(run, REPO))
    assert_same_final_state(run, reference)


def kill_trial(work: Path, data: dict, reference: Path, trial: int, rng: random.Random, mode: str) -> bool:
    """SIGKILL a run at a random step ("step") or while a checkpoint is being written ("save"), resume, and
    compare with the reference. Returns whether the kill landed before the run finished."""
    name = f"kill{trial}"
    run = work / name
    shutil.rmtree(run, ignore_errors=True)
    cfg = config(work, data, name, save_every=rng.choice([3, 5, 7]))
    proc = start(cfg, REPO)
    if mode == "step":
        target = rng.randint(1, STEPS - 1)
        hit = wait_for(lambda: logged_steps(run) >= target, proc, poll=0.005)
    else:
        root = run / "checkpoints"
        hit = wait_for(
            lambda: root.is_dir() and any(p.name.startswith(".tmp-") for p in root.iterdir()), proc, poll=0
        )
    proc.kill()
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL or not hit
    attempt = resume(run, REPO)
    if attempt.returncode != 0 and "no checkpoints" in attempt.stderr:  # killed before the first save
        check(train_single(cfg, cwd=REPO))
    else:
        check(attempt)
    assert_same_final_state(run, reference)
    return hit


@pytest.mark.parametrize(("trial", "mode"), [(0, "step"), (1, "save"), (2, "save")])
def test_sigkill_then_resume_equals_uninterrupted(
    work: Path, data: dict, reference: Path, trial: int, mode: str
):
    assert kill_trial(work, data, reference, trial, random.Random(trial), mode), (
        "the run ended before the kill"
    )


@pytest.mark.slow
def test_sigkill_random_trials(work: Path, data: dict, reference: Path):
    """FAULT_TRIALS kills at random steps and saves; the seed is printed (and DSTRAIN_FAULT_SEED replays it)."""
    seed = int(os.environ.get("DSTRAIN_FAULT_SEED", time.time_ns() % 10_000))
    rng = random.Random(seed)
    modes = [rng.choice(["step", "save"]) for _ in range(FAULT_TRIALS)]
    hits = [kill_trial(work, data, reference, 100 + t, rng, mode) for t, mode in enumerate(modes)]
    print(f"fault seed {seed}: {list(zip(modes, hits, strict=True))}")
    misses = sum(not hit for hit in hits)
    assert misses <= max(1, FAULT_TRIALS // 10), "most kills must land while the run is still going"


def test_inspect_reports_and_verifies(work: Path, reference: Path):
    ckpt = reference / FINAL
    proc = check(dstrain("inspect", str(ckpt), cwd=REPO))
    for needle in ("step", "tokens", "world_size", "config_digest", "optimizer.safetensors", "manifest: ok"):
        assert needle in proc.stdout, needle
    info = json.loads(check(dstrain("inspect", str(reference), "--json", cwd=REPO)).stdout)
    assert info["step"] == STEPS and info["world_size"] == 1 and info["valid"] is True
    broken = work / "broken-ckpt"
    shutil.copytree(ckpt, broken)
    data = bytearray((broken / "optimizer.safetensors").read_bytes())
    data[-1] ^= 1
    (broken / "optimizer.safetensors").write_bytes(bytes(data))
    (broken / "scheduler.json").unlink()
    proc = dstrain("inspect", str(broken), cwd=REPO)
    assert proc.returncode == 1
    assert (
        "optimizer.safetensors: sha256 does not match" in proc.stdout
        and "scheduler.json: missing" in proc.stdout
    )
    assert "Traceback" not in proc.stderr


def test_resume_refuses_structural_overrides_and_bad_paths(work: Path, reference: Path):
    proc = resume(reference, REPO, "--set", "lora.r=4")
    assert proc.returncode == 2 and "lora.r: fixed by the checkpoint" in proc.stderr
    proc = resume(work / "does-not-exist", REPO)
    assert proc.returncode == 2 and "no such file or directory" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_resume_extends_max_steps(work: Path, reference: Path):
    run = work / "extended"
    shutil.copytree(reference, run)
    check(resume(run, REPO, "--set", f"train.max_steps={STEPS + 4}", "--set", "train.save_every=0"))
    state = json.loads((run / f"checkpoints/step-{STEPS + 4:08d}/trainer_state.json").read_text())
    assert state["step"] == STEPS + 4
    assert sorted(train_losses(run)) == list(range(1, STEPS + 5))


def test_a_failing_save_fails_cleanly(work: Path, data: dict):
    """The checkpoint dir cannot be written (it is a file): a clear error, not a traceback."""
    cfg = config(work, data, "unwritable", max_steps=4, save_every=2)
    run = work / "unwritable"
    run.mkdir()
    (run / "checkpoints").write_text("in the way")
    proc = train_single(cfg, cwd=REPO)
    assert proc.returncode != 0
    assert "could not write checkpoint" in proc.stderr and "Traceback" not in proc.stderr


def test_bf16_weights_resume_exactly(work: Path, data: dict):
    """bf16 base + fp32 LoRA masters in DeepSpeed's bf16 mode: the masters, not the bf16 copies, are saved."""
    cfg = write_config(
        work,
        data,
        "bf16",
        model={"path": "builtin:tiny", "dtype": "bf16"},
        lora=LORA,
        train={**TRAIN, "max_steps": 8, "save_every": 4},
    )
    check(train_single(cfg, cwd=REPO))
    full = work / "bf16"
    fork = work / "bf16_fork"
    shutil.copytree(full, fork)
    shutil.rmtree(fork / "checkpoints/step-00000008")
    check(resume(fork, REPO))
    for name in ("adapter_model.safetensors", "optimizer.safetensors"):
        got = load_file(str(fork / "checkpoints/step-00000008" / name))
        want = load_file(str(full / "checkpoints/step-00000008" / name))
        assert all(v.dtype == torch.float32 for v in want.values())
        assert [k for k in want if not torch.equal(got[k], want[k])] == []
    assert train_losses(fork) == train_losses(full)
