"""The cheap checks of the GPU benchmark call (bench/gpu/run.sh), so it cannot rot between GPU loans: part
deadlines kill whole process trees, $OUT stays within what the device tool brings back, and the report and
plan fall back to dstrain rows when TRL is missing. The full CPU dry run is `SMOKE=1 bash bench/gpu/run.sh`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench"
for path in (BENCH, BENCH / "gpu"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import gpu_out  # noqa: E402
import gpu_plan  # noqa: E402
from bench_deadline import run_with_deadline  # noqa: E402
from gpu_run import summary  # noqa: E402

# a child that starts a grandchild in its own session (as the benches start their ranks), then waits or exits
SPAWNER = textwrap.dedent(
    """
    import subprocess, sys, time
    grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)
    open(sys.argv[1], "w").write(str(grandchild.pid))
    time.sleep(float(sys.argv[2]))
    """
)
FOUND = {
    name: "1.0"
    for name in ("torch", "deepspeed", "dstrain.train", "dstrain.training.loop", "yaml", "datasets", "peft")
}


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in "ZX"


def wait_for_pid(path: Path) -> int:
    for _ in range(100):
        if path.is_file() and path.read_text():
            return int(path.read_text())
        time.sleep(0.05)
    raise AssertionError("the child never wrote its grandchild's pid")


def test_deadline_kills_a_grandchild_in_its_own_session(tmp_path):
    pidfile = tmp_path / "pid"
    outcome = run_with_deadline([sys.executable, "-c", SPAWNER, str(pidfile), "300"], 3, tmp_path / "log")
    grandchild = wait_for_pid(pidfile)
    assert outcome.timed_out and outcome.code is None
    assert outcome.seconds < 120  # hang guard, not a speed test: without the deadline the child runs 300 s
    assert not alive(grandchild), "the grandchild outlived the deadline"
    assert outcome.survivors == []
    assert "cut at its deadline" in outcome.status


def test_what_a_finished_part_left_running_is_killed(tmp_path):
    pidfile = tmp_path / "pid"
    outcome = run_with_deadline([sys.executable, "-c", SPAWNER, str(pidfile), "0"], 60, tmp_path / "log")
    grandchild = wait_for_pid(pidfile)
    assert outcome.code == 0 and not outcome.timed_out
    assert grandchild in outcome.swept
    assert not alive(grandchild)


def test_out_holds_at_most_six_plain_files_and_the_tarball_has_every_log(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir()
    (out / gpu_out.SETUP).write_text("setup\n")
    names = ["sft", "long", "dpo", "qlora", "step"]
    for index, name in enumerate(names):  # five parts: the fifth JSON must go into the tarball
        path = gpu_out.result_path(name, index, out, work)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"part": name}))
        launch_logs = work / name / "launch"
        launch_logs.mkdir(parents=True)
        (launch_logs / f"{name}-dstrain.log").write_text("x" * 100)
    (work / "logs").mkdir()
    (work / "logs" / "big.log").write_bytes(b"y" * (gpu_out.LOG_TAIL + 1000))
    (work / "model").mkdir()
    (work / "model" / "config.json").write_text("{}")  # the model dir is no log
    gpu_out.pack_logs(work, out)
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(["setup.txt", "sft.json", "long.json", "dpo.json", "qlora.json", "logs.tar.gz"])
    assert gpu_out.check_out(out) == []
    with tarfile.open(out / gpu_out.TARBALL) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert "results/step.json" in members
    assert "qlora/launch/qlora-dstrain.log" in members
    assert "model/config.json" not in members
    assert members["logs/big.log"].size < gpu_out.LOG_TAIL + 100


def test_check_out_names_what_the_device_tool_would_drop(tmp_path):
    for index in range(7):
        (tmp_path / f"f{index}.json").write_text("{}")
    deep = tmp_path / "a" / "b" / "c"
    deep.mkdir(parents=True)
    (deep / "file.txt").write_text("x")
    (tmp_path / "bad name.txt").write_text("x")
    problems = " ".join(gpu_out.check_out(tmp_path))
    assert "over 6" in problems and "two folders deep" in problems and "bad name.txt" in problems


@pytest.mark.parametrize("smoke", [False, True])
def test_every_launch_timeout_fires_before_its_part_deadline(smoke):
    for part in gpu_plan.plan(list(gpu_plan.PARTS), {**FOUND, "trl": "1", "cuda": "H200"}, smoke):
        for deadline in range(part.minimum, part.cap + 1):
            assert part.launch_timeout(deadline) < deadline, (part.name, deadline)


def test_gpu_parts_time_40_steps_after_20_warmup_and_alternate_their_order():
    parts = gpu_plan.plan(["sft", "long", "dpo"], {**FOUND, "trl": "1", "cuda": "H200"}, smoke=False)
    args = parts[0].args
    assert args[args.index("--steps") + 1] == "60" and args[args.index("--warmup") + 1] == "20"
    assert [p.order for p in parts] == ["forward", "reverse", "forward"]
    assert parts[0].variants == ["dstrain", "hf", "trl"]  # hf-liger: liger_kernel/triton missing here
    assert "liger_kernel" in parts[0].dropped["hf-liger"]


def test_without_trl_the_plan_keeps_dstrain_rows_and_says_why():
    parts = gpu_plan.plan(["sft", "dpo", "qlora"], {**FOUND, "trl": "MISSING ImportError"}, smoke=True)
    sft, dpo, qlora = parts
    assert "trl" not in sft.variants and "dstrain" in sft.variants
    assert dpo.variants == ["dstrain"] and "trl" in dpo.dropped["trl"]
    assert qlora.skipped == "skipped: bitsandbytes missing"


def test_without_trl_the_report_and_benches_import_and_name_it_missing():
    # a blocked import (sys.modules[name] = None) raises ImportError, as an absent package does
    code = textwrap.dedent(
        """
        import sys
        sys.modules["trl"] = None
        sys.path[:0] = ["bench"]
        import bench_report, sft_bench, dpo_bench
        line = bench_report.machine_line()
        assert "trl missing" in line, line
        assert sft_bench.parse_args(["--variants", "dstrain"]).variants == ["dstrain"]
        print(line)
        """
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "trl missing" in proc.stdout


def test_summary_names_rows_that_ran_failed_or_were_cut(tmp_path):
    part = gpu_plan.Part("sft", "sft_bench.py", [], ["dstrain", "hf", "trl"], 100, 20)
    part.dropped["hf-liger"] = "needs CUDA"
    part.result = tmp_path / "sft.json"
    row = {"tokens": 1000, "seconds": 2.0, "pairs": 0, "peak_mem_gb": None}
    part.result.write_text(
        json.dumps({"complete": False, "runs": [{"results": {"dstrain": row, "hf": None}}]})
    )
    outcome = run_with_deadline([sys.executable, "-c", "import time; time.sleep(30)"], 0.5, tmp_path / "log")
    skipped = gpu_plan.Part("qlora", "sft_bench.py", [], ["dstrain"], 100, 20, skipped="skipped: no bnb")
    text = "\n".join(summary([part, skipped], {"sft": outcome}))
    assert "| sft | dstrain | ran | 500 |" in text
    assert "| sft | hf | failed" in text
    assert "| sft | trl | cut at its deadline" in text
    assert "| sft | hf-liger | not run: needs CUDA" in text
    assert "| qlora | dstrain | skipped: no bnb" in text


def test_run_script_parses():
    for script in ("run.sh", "make_wheels.sh"):
        subprocess.run(["bash", "-n", str(BENCH / "gpu" / script)], check=True)
