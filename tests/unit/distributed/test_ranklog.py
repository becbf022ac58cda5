"""Per-rank logs: rank 0 prints to the console and its log; another rank prints only to its log (C-level
output included), except its errors, which reach the console too. Real file descriptors, so a child process."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from tests.diskfull import tmpfs

SCRIPT = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from dstrain.distributed import ranklog

    log = ranklog.start(Path(sys.argv[1]), int(sys.argv[2]), 2)
    print("progress line")
    os.write(2, b"native stderr\\n")  # what gloo or NCCL would print
    ranklog.error("error: the one message")
    ranklog.stop()
    print("after the log")
    """
)


def run_rank(tmp_path: Path, rank: int) -> tuple[subprocess.CompletedProcess, str]:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path), str(rank)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    return proc, (tmp_path / "logs" / f"rank-{rank:05d}.log").read_text()


def test_rank_0_tees_the_console_into_its_log(tmp_path):
    proc, log = run_rank(tmp_path, 0)
    assert proc.stdout == "progress line\nafter the log\n"
    assert "native stderr" in proc.stderr and "error: the one message" in proc.stderr
    assert log.startswith("===== ") and "rank 0/2 on " in log.splitlines()[0]
    assert "progress line" in log and "error: the one message" in log and "after the log" not in log


def test_other_ranks_are_silent_on_the_console_but_for_errors(tmp_path):
    proc, log = run_rank(tmp_path, 1)
    assert proc.stdout == "after the log\n"  # the console is back once the log stops
    assert proc.stderr == "error: the one message\n"
    for line in ("progress line", "native stderr", "error: the one message"):
        assert line in log


def test_each_attempt_appends_a_header(tmp_path):
    run_rank(tmp_path, 1)
    _, log = run_rank(tmp_path, 1)
    assert log.count("===== ") == 2 and log.count("progress line") == 2


FULL_DISK_SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from dstrain.distributed import ranklog

    run_dir = Path(sys.argv[1])
    ranklog.start(run_dir, 0, 2)
    with open(run_dir / "filler", "wb", buffering=0) as filler:  # the log's disk fills up under the run
        try:
            while True:
                filler.write(b"x" * 4096)
                filler.flush()
        except OSError:
            pass
    print("progress " * 1000)  # more than the log's last page (4 KiB) holds
    ranklog.error("error: the one message")
    ranklog.stop()
    print("after the log")
    """
)


def test_a_full_log_disk_never_silences_the_console(tmp_path):
    with tmpfs(tmp_path / "disk", "64k") as disk:
        proc = subprocess.run(
            [sys.executable, "-c", FULL_DISK_SCRIPT, str(disk)], capture_output=True, text=True, timeout=60
        )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "progress " * 1000 + "\nafter the log\n"
    assert proc.stderr.count("error: the one message") == 1 and "Traceback" not in proc.stderr
