"""`dstrain train --num-gpus/--hostfile` starts the deepspeed launcher of the environment dstrain runs in,
whatever is on PATH (the launch itself: tests/distributed/test_launchers.py)."""

from __future__ import annotations

import os
import sys
import sysconfig
from pathlib import Path

from dstrain.distributed.launcher import launcher_command, launcher_env


def test_the_launcher_is_this_interpreters_deepspeed_runner():
    cmd = launcher_command(2, None, ["--config", "run.yaml"])
    assert cmd[:5] == [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2"]
    assert cmd[-4:] == ["--module", "dstrain.train", "--config", "run.yaml"]
    multi = launcher_command(None, Path("hosts"), [])
    assert multi[3:5] == ["--hostfile", "hosts"] and "--master_port" not in multi  # the hostfile's port


def test_the_environments_scripts_come_first_on_the_launchers_path(monkeypatch):
    scripts = sysconfig.get_path("scripts")
    monkeypatch.setenv("PATH", os.pathsep.join(["/usr/bin", scripts, "/bin"]))
    assert launcher_env()["PATH"].split(os.pathsep) == [scripts, "/usr/bin", "/bin"]
    monkeypatch.delenv("PATH")
    assert launcher_env()["PATH"] == scripts
