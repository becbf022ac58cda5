"""Locks left behind by interrupted builds of DeepSpeed's JIT-compiled ops.

DeepSpeed compiles its ops (cpu_adam, fused_adam, shm_comm) on first use through
`torch.utils.cpp_extension`, which guards each op's build directory with a `lock` file: the process that
creates it builds, every other process polls until the file disappears. A builder killed mid-build (a
timeout, Ctrl-C, a SIGKILLed rank, a preempted node) never removes it, and every later run on that node
then waits for it forever before its first step, silently: no collective timeout covers it. The build
cache outlives the job (it lives in the home directory), so one interrupted build hangs every future job.

A lock is taken to be abandoned when it is old enough that its build must have started compiling and no
process is compiling in its directory (torch runs ninja, and ninja the compiler, with the build directory
as working directory). Such a lock is removed, and the op is rebuilt by the first rank that needs it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from dstrain.distributed.env import first_on_path
from dstrain.errors import DistributedError

# Between taking the lock and starting ninja, torch only writes build.ninja: a minute is ample.
MIN_AGE_S = 60.0
# When some processes cannot be inspected (other users'), only a lock this old is taken as abandoned.
UNSURE_AGE_S = 1800.0


@dataclass(frozen=True)
class Verdict:
    lock: Path
    age_s: float
    removed: bool
    note: str


def use_install_cache() -> Path:
    """Give this DeepSpeed install its own JIT-op cache unless the user chose one (TORCH_EXTENSIONS_DIR).

    torch's default cache, ~/.cache/torch_extensions/<python>_<device>/<op>, is shared by every install on
    the machine. Two virtualenvs with their own DeepSpeed then rebuild each other's ops in turn: each build
    writes build.ninja naming its own sources, the other install finds it stale and compiles again (about
    50 s, before the first step). A subdirectory per DeepSpeed install path keeps one build per install.
    Set in the environment, it reaches torch's extension loader at build time and the ranks' children.
    """
    use_install_ninja()
    chosen = os.environ.get("TORCH_EXTENSIONS_DIR")
    if chosen:
        return Path(chosen)
    spec = importlib.util.find_spec("deepspeed")
    install = str(Path(spec.origin).resolve().parent) if spec and spec.origin else sys.prefix
    tag = hashlib.sha256(install.encode()).hexdigest()[:12]
    root = Path("~/.cache/torch_extensions").expanduser() / f"dstrain-{tag}"
    os.environ["TORCH_EXTENSIONS_DIR"] = str(root)
    return root


def use_install_ninja() -> Path | None:
    """Put the ninja installed beside this interpreter (pip's, a DeepSpeed dependency) first on PATH, and
    return its directory (None where there is none: whatever ninja PATH finds builds, always the same one).

    torch builds an op with whichever `ninja` PATH finds first, and ninja rebuilds everything whose logged
    command hash differs. Ninja versions hash differently (1.11 MurmurHash, 1.13 rapidhash), so a run from
    an activated venv (pip's 1.13) and one without (a system 1.11 in /usr/bin) each find the other's build
    stale: the op is compiled again, 1.5-3 min before the first step, on every alternation.
    """
    scripts = Path(sysconfig.get_path("scripts"))
    if not (scripts / "ninja").is_file():
        return None
    os.environ["PATH"] = first_on_path(str(scripts), os.environ.get("PATH", ""))
    return scripts


def extensions_root() -> Path:
    """Where torch keeps JIT-built extensions (TORCH_EXTENSIONS_DIR, else ~/.cache/torch_extensions)."""
    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path("~/.cache/torch_extensions").expanduser())


def clear_stale(root: Path | None = None) -> list[Verdict]:
    """Remove abandoned build locks under `root`; a verdict per lock that is old enough to matter.

    Raises DistributedError when an abandoned lock cannot be removed: the run would wait forever.
    """
    root = root or extensions_root()
    now = time.time()
    locks = [
        (lock, st) for lock in root.glob("**/lock") if (st := _stat(lock)) and now - st.st_mtime >= MIN_AGE_S
    ]
    if not locks:
        return []
    build_dirs, unsure = _busy_build_dirs()
    return [_settle(lock, now - st.st_mtime, st.st_uid, build_dirs, unsure) for lock, st in locks]


def _settle(lock: Path, age: float, owner: int, busy: set[Path], unsure: bool) -> Verdict:
    op = lock.parent.name
    if lock.parent.resolve() in busy:
        return Verdict(lock, age, False, f"waiting for the build of DeepSpeed's {op} op in progress ({lock})")
    # torch creates the lock as its builder; processes we cannot inspect belong to other users
    if unsure and age < UNSURE_AGE_S and owner != os.getuid():
        return Verdict(
            lock,
            age,
            False,
            f"{lock} is {age / 60:.0f} min old and may belong to another user's build of DeepSpeed's {op} op; "
            "if the run does not start and no build is running, delete it",
        )
    try:
        lock.unlink()
    except FileNotFoundError:  # its build just finished
        return Verdict(lock, age, False, f"the build of DeepSpeed's {op} op finished")
    except OSError as exc:
        raise DistributedError(
            f"{lock} was left {age / 60:.0f} min ago by an interrupted build of DeepSpeed's {op} op, and it "
            f"cannot be removed ({exc.strerror}): every run would wait for it forever.\n"
            f"Delete it, or set TORCH_EXTENSIONS_DIR to a directory you can write."
        ) from exc
    return Verdict(
        lock,
        age,
        True,
        f"removed {lock}: an interrupted build of DeepSpeed's {op} op left it {age / 60:.0f} min ago and "
        "nothing is building it now; the op is rebuilt on first use",
    )


def _stat(lock: Path) -> os.stat_result | None:
    try:
        return lock.stat()
    except OSError:  # gone between the glob and the stat
        return None


def _busy_build_dirs() -> tuple[set[Path], bool]:
    """Working directories of all live processes, and whether some could not be inspected."""
    busy: set[Path] = set()
    unsure = False
    for proc in psutil.process_iter():
        try:
            busy.add(Path(proc.cwd()).resolve())
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        except (psutil.AccessDenied, OSError):
            unsure = True
    return busy, unsure


# First builds of each op measured on a 2-core CPU machine (s); a GPU op under nvcc takes about as long.
# Only to tell the user roughly how long to wait: the build's real length depends on the machine.
FIRST_BUILD_S = {"cpu_adam": 50, "fused_adam": 50, "deepspeed_shm_comm": 30}


def op_build_dir(op: str, root: Path | None = None) -> Path:
    """The directory torch's JIT builder uses for `op` (torch.utils.cpp_extension._get_build_directory):
    TORCH_EXTENSIONS_DIR/<op> when that variable is set (as use_install_cache sets it), else
    ~/.cache/torch_extensions/<python>_<device>/<op>."""
    import sys

    import torch

    if root is None and os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"]) / op
    if root is not None:
        return root / op
    cuda = "cpu" if torch.version.cuda is None else f"cu{torch.version.cuda.replace('.', '')}"
    folder = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}_{cuda}"
    return extensions_root() / folder / op


def op_needs_build(op: str, root: Path | None = None) -> bool:
    """Whether loading DeepSpeed's `op` will compile it: not installed prebuilt, and no library in the cache
    built from this DeepSpeed install's sources.

    The cache directory is per user, not per install: two environments on one machine share it, and each
    load from the other one rewrites build.ninja with its own source paths and recompiles (measured: a
    1-minute job took 2x as long). build.ninja names the sources the cached library was built from.
    """
    import deepspeed
    from deepspeed.git_version_info import installed_ops

    if installed_ops.get(op, False):
        return False
    build_dir = op_build_dir(op, root)
    try:
        recipe = (build_dir / "build.ninja").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return True
    ours = str(Path(deepspeed.__file__).resolve().parent / "ops" / "csrc")
    return not (build_dir / f"{op}.so").is_file() or ours not in recipe


def build_notice(op: str, root: Path | None = None) -> str | None:
    """The line to say before DeepSpeed loads `op`, when loading it will compile it first (else None).

    The first run on a machine otherwise sits silent for the length of the compile, and looks hung.
    """
    if not op_needs_build(op, root):
        return None
    first = not (op_build_dir(op, root) / f"{op}.so").is_file()
    why = "first run on this machine" if first else "its cache was built by another DeepSpeed install"
    return (
        f"building DeepSpeed's {op} op ({why}; about {FIRST_BUILD_S.get(op, 60)} s)... "
        f"it is cached under {op_build_dir(op, root).parent} for later runs"
    )
