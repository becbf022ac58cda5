"""An interrupted DeepSpeed op build must not hang every later run on the node."""

import importlib.machinery
import os
import shutil
import subprocess
import sysconfig
import time
from pathlib import Path

import pytest
from torch.utils.file_baton import FileBaton

from dstrain.distributed import buildlocks
from dstrain.errors import DistributedError


def _lock(root: Path, op: str, age_s: float) -> Path:
    build_dir = root / "py311_cpu" / op
    build_dir.mkdir(parents=True)
    lock = build_dir / "lock"
    lock.write_text("")
    then = time.time() - age_s
    os.utime(lock, (then, then))
    return lock


def test_an_abandoned_lock_is_removed_and_torch_can_build_again(tmp_path):
    lock = _lock(tmp_path, "cpu_adam", age_s=3600)
    assert not FileBaton(str(lock)).try_acquire()  # what every later run would wait on, forever

    [verdict] = buildlocks.clear_stale(tmp_path)

    assert verdict.removed and not lock.exists()
    assert "removed" in verdict.note and "cpu_adam" in verdict.note and "60 min ago" in verdict.note
    assert FileBaton(str(lock)).try_acquire()  # the next build takes the lock as torch would


def test_a_fresh_lock_is_a_build_starting_and_is_left_alone(tmp_path):
    lock = _lock(tmp_path, "fused_adam", age_s=5)
    assert buildlocks.clear_stale(tmp_path) == []
    assert lock.exists()


def test_a_lock_whose_directory_a_process_is_compiling_in_is_kept(tmp_path):
    lock = _lock(tmp_path, "deepspeed_shm_comm", age_s=3600)
    compiler = subprocess.Popen(["sleep", "60"], cwd=lock.parent)  # ninja and the compiler run there
    try:
        [verdict] = buildlocks.clear_stale(tmp_path)
    finally:
        compiler.kill()
        compiler.wait()
    assert not verdict.removed and lock.exists()
    assert "in progress" in verdict.note


def test_an_abandoned_lock_that_cannot_be_removed_is_one_clear_error(tmp_path, monkeypatch):
    lock = _lock(tmp_path, "cpu_adam", age_s=3600)

    def refuse(self, missing_ok=False):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "unlink", refuse)  # root ignores file modes, so the refusal is simulated
    with pytest.raises(DistributedError, match="wait for it forever") as caught:
        buildlocks.clear_stale(tmp_path)
    assert str(lock) in str(caught.value) and "TORCH_EXTENSIONS_DIR" in str(caught.value)


def test_the_extensions_root_follows_torch_extensions_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert buildlocks.extensions_root() == tmp_path


def test_each_deepspeed_install_gets_its_own_op_cache(monkeypatch):
    """Two venvs must not rebuild each other's ops in the shared ~/.cache/torch_extensions."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "")  # restored after the test, whatever the calls set
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    root = buildlocks.use_install_cache()
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(root) and root.name.startswith("dstrain-")
    assert buildlocks.extensions_root() == root
    assert buildlocks.use_install_cache() == root  # the same install: the same cache, every call and rank

    other = "/elsewhere/venv/lib/python3.11/site-packages/deepspeed/__init__.py"
    fake = importlib.machinery.ModuleSpec("deepspeed", None, origin=other)
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    monkeypatch.setattr(buildlocks.importlib.util, "find_spec", lambda name: fake)
    assert buildlocks.use_install_cache() != root


def test_a_chosen_op_cache_is_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert buildlocks.use_install_cache() == tmp_path
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(tmp_path)


def test_ops_build_with_the_ninja_installed_beside_this_interpreter(monkeypatch):
    """Ninja 1.11 (a system one) and 1.13 (pip's) hash build commands differently; whichever builds an op,
    the other finds it stale and compiles again. Every dstrain process must pick the same one: pip's."""
    scripts = sysconfig.get_path("scripts")
    assert Path(scripts, "ninja").is_file(), "deepspeed depends on pip's ninja; the test venv has it"
    monkeypatch.setenv("PATH", os.pathsep.join(["/usr/bin", "/bin", scripts]))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "")  # restored after the test
    buildlocks.use_install_cache()
    assert os.environ["PATH"].split(os.pathsep) == [scripts, "/usr/bin", "/bin"]
    assert shutil.which("ninja") == str(Path(scripts, "ninja"))


def test_without_a_ninja_beside_the_interpreter_path_is_left_alone(tmp_path, monkeypatch):
    monkeypatch.setattr(buildlocks.sysconfig, "get_path", lambda name: str(tmp_path))
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert buildlocks.use_install_ninja() is None
    assert os.environ["PATH"] == "/usr/bin:/bin"
