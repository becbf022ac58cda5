"""A probe that makes one write of a dstrain run fail with ENOSPC, at the library boundary where a full disk
shows up, so a test can check what the run says and leaves behind without filling a real disk.

Put this directory on PYTHONPATH (Python imports `sitecustomize` at start-up, in every process a launcher
starts) and set:
  DSTRAIN_DISKFULL_AT    checkpoint: safetensors' save_file raises SafetensorError "... (os error 28)", as
                         it does on a full disk (two calls per checkpoint: adapter, then optimizer)
                         metrics: a write to metrics.jsonl raises OSError(ENOSPC)
                         index: writing the data index cache raises OSError(ENOSPC)
  DSTRAIN_DISKFULL_CALL  which call fails (default 1: the first); later calls fail too (the disk stays full)
  DSTRAIN_DISKFULL_RANKS comma-separated ranks where it fails (default: all)
  DSTRAIN_DISKFULL_FREE  bytes that shutil.disk_usage reports free (what the messages and the start-up
                         check see), optional
  DSTRAIN_DISKFULL_SINGLE "1" for a run without a launcher (no RANK variable): the process itself fails
"""

from __future__ import annotations

import errno
import os


class Counter:
    def __init__(self) -> None:
        self.calls = 0
        self.first = int(os.environ.get("DSTRAIN_DISKFULL_CALL", "1"))

    def full(self) -> bool:
        self.calls += 1
        return self.calls >= self.first


def no_space() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def fail_checkpoints(counter: Counter) -> None:
    from safetensors import SafetensorError

    import dstrain.checkpoint.save as save

    original = save.save_file

    def save_file(*args, **kwargs):
        if counter.full():
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return original(*args, **kwargs)

    save.save_file = save_file


class FullFile:
    """A file object whose writes fail once the counter says the disk is full."""

    def __init__(self, file, counter: Counter) -> None:
        self.file, self.counter = file, counter

    def write(self, text: str) -> int:
        if self.counter.full():
            raise no_space()
        return self.file.write(text)

    def __getattr__(self, name: str):
        return getattr(self.file, name)


def fail_metrics(counter: Counter) -> None:
    import dstrain.metrics.sinks as sinks

    original = sinks.JsonlSink.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.file = FullFile(self.file, counter)

    sinks.JsonlSink.__init__ = init


def fail_index(counter: Counter) -> None:
    import dstrain.data.index as index

    original = index.write_entry

    def write_entry(*args, **kwargs):
        if counter.full():
            raise no_space()
        return original(*args, **kwargs)

    index.write_entry = write_entry


def report_free(free: int) -> None:
    import shutil

    original = shutil.disk_usage

    def disk_usage(path):
        usage = original(path)
        return type(usage)(usage.total, usage.total - free, free)

    shutil.disk_usage = disk_usage


def install() -> None:
    ranks = os.environ.get("DSTRAIN_DISKFULL_RANKS", "")
    if ranks and os.environ.get("RANK", "0") not in ranks.split(","):
        return
    if free := os.environ.get("DSTRAIN_DISKFULL_FREE"):
        report_free(int(free))
    where = os.environ.get("DSTRAIN_DISKFULL_AT")
    if where:
        {"checkpoint": fail_checkpoints, "metrics": fail_metrics, "index": fail_index}[where](Counter())


def is_rank_process() -> bool:
    """A rank (launchers set RANK), or the one process of a single-process test; not a launcher."""
    return "RANK" in os.environ or os.environ.get("DSTRAIN_DISKFULL_SINGLE") == "1"


wanted = os.environ.get("DSTRAIN_DISKFULL_AT") or os.environ.get("DSTRAIN_DISKFULL_FREE")
if wanted and is_rank_process():
    install()
