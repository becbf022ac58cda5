"""A throwaway single-host Slurm cluster (munged + slurmctld + slurmd) for tests.

Everything lives in one private directory: the munge key and socket, slurm.conf, the controller's state,
slurmd's spool, pid files and logs. The daemons listen on free ports and talk through their own munge
socket (``AuthInfo=socket=...``), so they cannot clash with a system Slurm or munge. Clients find the
cluster through ``SLURM_CONF`` in :attr:`SlurmCluster.env`; ``os.environ`` is never changed.

Needs root (slurmd runs jobs as root here) and Debian's ``slurm-wlm`` and ``munge`` packages.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import IO, Any

from tests.slurm.conf import slurm_conf

INSTALL_HINT = "slurm: Debian's slurm-wlm and munge are not installed (apt-get install -y slurm-wlm munge)"
DAEMONS = ("munged", "slurmctld", "slurmd", "slurmstepd")
CLIENTS = ("sbatch", "srun", "scontrol", "scancel", "squeue", "sinfo")
SEARCH_PATH = ("/usr/sbin", "/usr/bin", "/sbin", "/bin")
# Terminal states of `scontrol show job`; the record lingers for MinJobAge seconds after the job ends.
FINISHED = (
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "PREEMPTED",
    "BOOT_FAIL",
    "DEADLINE",
)
# Inherited variables that would point the clients at another cluster or job (e.g. pytest run in a job).
_FOREIGN_ENV = re.compile(r"^(SLURM_|SBATCH_|SRUN_|SALLOC_|SQUEUE_|SINFO_|SCONTROL_|SACCT_)")
_FIELD = re.compile(r"(?:^|\s)([A-Za-z][\w:/]*)=")
# The private directory's layout: only munge's key and slurmctld's state need to stay private.
_DIRS = {"etc": 0o755, "munge": 0o700, "run": 0o755, "state": 0o700, "spool": 0o755, "log": 0o755}
# slurmd and slurmctld load every MPI plugin at start; Debian's mpi/pmix ones fail without libpmix.
_NOISE = re.compile(r"pmix|MPI: Cannot create context", re.IGNORECASE)


class SlurmUnavailableError(RuntimeError):
    """The cluster cannot run here; the message is one line fit for a skip reason."""


def find_binaries(names: Iterable[str] = DAEMONS + CLIENTS) -> tuple[dict[str, str], list[str]]:
    """Absolute paths of the Slurm and munge programs, and the names that are missing."""
    path = os.pathsep.join([os.environ.get("PATH", ""), *SEARCH_PATH])
    found: dict[str, str] = {}
    missing: list[str] = []
    for name in names:
        where = shutil.which(name, path=path)
        if where:
            found[name] = where
        else:
            missing.append(name)
    return found, missing


def parse_fields(line: str) -> dict[str, str]:
    """``Key=value Key2=value two`` (one ``scontrol show -o`` record) to a dict; values may hold spaces."""
    marks = list(_FIELD.finditer(line))
    fields: dict[str, str] = {}
    for mark, nxt in zip(marks, [*marks[1:], None], strict=True):
        end = nxt.start() if nxt else len(line)
        fields[mark.group(1)] = line[mark.end() : end].strip()
    return fields


def wait_for(
    check: Callable[[], Any],
    timeout: float,
    what: str,
    interval: float = 0.25,
    detail: Callable[[], str] | None = None,
) -> Any:
    """Poll ``check`` until it returns something truthy; TimeoutError naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            extra = f": {detail()}" if detail else ""
            raise TimeoutError(f"{what} within {timeout:g} s{extra}")
        time.sleep(interval)


def tail(path: Path, lines: int = 15) -> str:
    """The last non-blank lines of a log, joined on one line, without Debian's harmless PMIx complaints."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return f"(no {path.name})"
    kept = [line for line in text.splitlines() if line.strip() and not _NOISE.search(line)][-lines:]
    return " | ".join(kept) if kept else f"({path.name} is empty)"


class SlurmCluster:
    """One controller and one node (this host) with a ``debug`` partition; use as a context manager."""

    def __init__(
        self, parent: Path | str = "/tmp", register_timeout: float = 60.0, keep: bool = False
    ) -> None:
        self.parent = Path(parent)
        self.register_timeout = register_timeout
        self.keep = keep
        self.node = socket.gethostname().split(".")[0]
        self.bin: dict[str, str] = {}
        self.state_dir = Path()
        self.conf = Path()
        self.env: dict[str, str] = {}
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._outputs: list[IO[bytes]] = []

    # -- lifecycle ---------------------------------------------------------------------------------------

    def __enter__(self) -> SlurmCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Write the configuration, start the daemons and wait for the node; SlurmUnavailableError if it can't."""
        self.bin, missing = find_binaries()
        if missing:
            raise SlurmUnavailableError(f"{INSTALL_HINT}; missing: {', '.join(missing)}")
        if os.geteuid() != 0:
            raise SlurmUnavailableError(
                "slurm: the test cluster must run as root (SlurmUser=root, jobs run as root)"
            )
        try:
            self._prepare()
            self._start_munged()
            self._start_slurmctld()
            self._start_slurmd()
        except SlurmUnavailableError as err:
            self.stop(remove=False)
            raise SlurmUnavailableError(f"{err} [kept {self.state_dir}]") from None
        except (OSError, subprocess.SubprocessError) as err:
            self.stop(remove=False)
            raise SlurmUnavailableError(
                f"slurm: cannot start the test cluster: {err} [kept {self.state_dir}]"
            ) from err
        except BaseException:
            self.stop(remove=False)
            raise

    def stop(self, remove: bool = True) -> None:
        """Cancel jobs, stop the daemons (TERM, then KILL) and kill whatever still runs with our SLURM_CONF."""
        if self._alive("slurmctld"):
            try:
                self.run(["scancel", f"--user={os.getuid()}"], timeout=15)
                if self._alive("slurmd"):  # only slurmd can finish the jobs' COMPLETING phase
                    wait_for(
                        lambda: not self.run(["squeue", "-h"], timeout=15).stdout.strip(), 15, "jobs gone"
                    )
            except (TimeoutError, subprocess.TimeoutExpired):
                pass  # whatever still runs is killed below
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self._procs.pop(name, None)
            if proc is None:
                continue
            if proc.poll() is None:
                proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)
        self._kill_strays()
        for out in self._outputs:
            out.close()
        self._outputs.clear()
        if remove and not self.keep and self.state_dir.name and self.state_dir.is_dir():
            shutil.rmtree(self.state_dir, ignore_errors=True)

    # -- clients -----------------------------------------------------------------------------------------

    def run(self, args: Sequence[str], timeout: float = 30, **kw: Any) -> subprocess.CompletedProcess[str]:
        """Run a command against this cluster (its env), capturing text output; never waits past ``timeout``."""
        kw.setdefault("env", self.env)
        kw.setdefault("capture_output", True)
        kw.setdefault("check", False)
        return subprocess.run(list(args), text=True, timeout=timeout, **kw)

    def sbatch(self, args: Sequence[str], **kw: Any) -> str:
        """``sbatch --parsable ARGS``; the job id (AssertionError with sbatch's stderr when it fails)."""
        done = self.run(["sbatch", "--parsable", *args], **kw)
        assert done.returncode == 0, f"sbatch failed ({done.returncode}): {done.stderr.strip()}"
        return done.stdout.strip().split(";")[0]

    def job(self, job_id: str | int) -> dict[str, str]:
        """The fields of ``scontrol show job -o JOBID`` (empty when Slurm does not know the job)."""
        done = self.run(["scontrol", "show", "job", "-o", str(job_id)])
        if done.returncode != 0 or not done.stdout.strip():
            return {}
        return parse_fields(done.stdout.strip().splitlines()[0])

    def wait_job(
        self, job_id: str | int, states: Iterable[str] = FINISHED, timeout: float = 60.0
    ) -> dict[str, str]:
        """Poll the job until its JobState is one of ``states``; its fields, or TimeoutError with the last."""
        wanted = set(states)
        last: dict[str, str] = {}

        def reached() -> dict[str, str] | None:
            nonlocal last
            last = self.job(job_id) or last
            return last if last.get("JobState") in wanted else None

        def detail() -> str:
            keys = ("JobState", "Reason", "ExitCode", "Restarts", "EligibleTime")
            return (
                " ".join(f"{k}={last.get(k)}" for k in keys) + f"; slurmctld: {self.log_tail('slurmctld', 5)}"
            )

        return wait_for(
            reached, timeout, f"job {job_id} did not reach {'/'.join(sorted(wanted))}", detail=detail
        )

    def log_tail(self, daemon: str, lines: int = 15) -> str:
        """The last lines of a daemon's log (its own log file, else what it wrote to stdout/stderr)."""
        log = self.state_dir / "log" / f"{daemon}.log"
        out = self.state_dir / "log" / f"{daemon}.out"
        if log.is_file() and log.stat().st_size:
            return tail(log, lines)
        return tail(out, lines)

    # -- setup -------------------------------------------------------------------------------------------

    def _prepare(self) -> None:
        # munged insists that every directory above its socket is searchable by all, which pytest's
        # 0700 basetemp is not; hence a directory of our own under /tmp.
        self.state_dir = Path(tempfile.mkdtemp(prefix="dstrain-slurm-", dir=self.parent))
        self.state_dir.chmod(0o755)
        for sub, mode in _DIRS.items():
            (self.state_dir / sub).mkdir(mode=mode)
        self.conf = self.state_dir / "etc" / "slurm.conf"
        (self.state_dir / "etc" / "plugstack.conf").write_text("", encoding="utf-8")
        self.conf.write_text(slurm_conf(self.state_dir, self.node, self._node_hardware()), encoding="utf-8")
        env = {k: v for k, v in os.environ.items() if not _FOREIGN_ENV.match(k)}
        dirs = dict.fromkeys(str(Path(p).parent) for p in self.bin.values())
        env["PATH"] = os.pathsep.join([*dirs, env.get("PATH", "")]).rstrip(os.pathsep)
        env["SLURM_CONF"] = str(self.conf)
        self.env = env

    def _node_hardware(self) -> str:
        """``CPUs=.. Boards=.. ... RealMemory=..`` of this host, as ``slurmd -C`` reports it."""
        done = subprocess.run([self.bin["slurmd"], "-C"], capture_output=True, text=True, timeout=60)
        first = done.stdout.strip().splitlines()[0] if done.stdout.strip() else ""
        if done.returncode != 0 or "CPUs=" not in first:
            raise SlurmUnavailableError(
                f"slurm: `slurmd -C` failed ({done.returncode}): {done.stderr.strip()[-500:]}"
            )
        return " ".join(tok for tok in first.split() if not tok.startswith("NodeName="))

    def _spawn(self, name: str, args: Sequence[str]) -> subprocess.Popen[bytes]:
        out = (self.state_dir / "log" / f"{name}.out").open("ab")
        self._outputs.append(out)
        proc = subprocess.Popen(
            list(args),
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._procs[name] = proc
        return proc

    def _alive(self, name: str) -> bool:
        proc = self._procs.get(name)
        return proc is not None and proc.poll() is None

    def _await(
        self,
        name: str,
        check: Callable[[], Any],
        timeout: float,
        what: str,
        why: Callable[[], str] | None = None,
    ) -> None:
        """Wait for ``check``; SlurmUnavailableError with ``why`` and the daemon's log tail on failure."""

        def ready() -> bool:
            if not self._alive(name):
                code = self._procs[name].returncode
                raise SlurmUnavailableError(f"slurm: {name} exited with {code}: {self.log_tail(name)}")
            return bool(check())

        try:
            wait_for(ready, timeout, what, interval=0.5)
        except TimeoutError as err:
            extra = f" ({why()})" if why else ""
            raise SlurmUnavailableError(f"slurm: {err}{extra}: {self.log_tail(name)}") from None

    def _start_munged(self) -> None:
        key = self.state_dir / "munge" / "munge.key"
        mungekey = find_binaries(["mungekey"])[0].get("mungekey")
        if mungekey:
            subprocess.run(
                [mungekey, "--create", f"--keyfile={key}"], capture_output=True, check=True, timeout=30
            )
        else:
            key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        sock = self.state_dir / "run" / "munge.socket"
        self._spawn(
            "munged",
            [
                self.bin["munged"],
                "--foreground",
                f"--socket={sock}",
                f"--key-file={key}",
                f"--log-file={self.state_dir / 'log' / 'munged.log'}",  # in the foreground, it logs to stderr
                f"--pid-file={self.state_dir / 'run' / 'munged.pid'}",
                f"--seed-file={self.state_dir / 'munge' / 'munged.seed'}",
            ],
        )
        self._await("munged", sock.exists, 20, "munged did not open its socket")

    def _start_slurmctld(self) -> None:
        self._spawn("slurmctld", [self.bin["slurmctld"], "-D", "-f", str(self.conf)])

        def up() -> bool:
            return "UP" in self.run(["scontrol", "ping"], timeout=20).stdout

        self._await("slurmctld", up, 30, "slurmctld did not answer `scontrol ping`")

    def _start_slurmd(self) -> None:
        self._spawn("slurmd", [self.bin["slurmd"], "-D", "-f", str(self.conf)])

        def node_state() -> str:
            return self.run(["sinfo", "-h", "-n", self.node, "-o", "%T %E"], timeout=20).stdout.strip()

        def idle() -> bool:
            return node_state().split(" ")[0] == "idle"

        def why() -> str:
            return (
                f"node {self.node}: {node_state() or 'unknown'}; slurmctld: {self.log_tail('slurmctld', 3)}"
            )

        self._await("slurmd", idle, self.register_timeout, "slurmd did not register (node idle)", why)

    def _kill_strays(self) -> None:
        """SIGKILL slurmstepd and job processes that outlived slurmd: they carry our SLURM_CONF."""
        if not self.env:
            return
        marker = f"SLURM_CONF={self.conf}".encode()
        for pid in _pids_with_env(marker):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _pids_with_env(marker: bytes) -> list[int]:
    mine = os.getpid()
    pids: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == mine:
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if marker in environ.split(b"\0"):
            pids.append(int(entry.name))
    return pids


def required() -> bool:
    """Whether a cluster that cannot start is an error rather than a skip (``DSTRAIN_REQUIRE_SLURM=1``)."""
    return os.environ.get("DSTRAIN_REQUIRE_SLURM", "") == "1"
