"""A probe that holds a dstrain run in one phase until a stop signal arrives, so a test can signal it there
deterministically (no sleep guessed against the run's timing).

Put this directory on PYTHONPATH (Python imports `sitecustomize` at start-up, in every process the
launchers start) and set:
  DSTRAIN_PROBE_PHASE  index | build | reference | step0_eval | eval | save
  DSTRAIN_PROBE_DIR    where `held.rank<R>` (holding the rank's pid) appears once the rank holds
  DSTRAIN_PROBE_RANKS  comma-separated ranks that hold (default: all); the others go on and wait for them
                       in the phase's agreement, as a rank that got no signal does
  DSTRAIN_PROBE_CALL   which call of the held function holds (default 1: the first)
  DSTRAIN_PROBE_SINGLE "1" for a run without a launcher (no RANK variable): the process itself holds
  DSTRAIN_PROBE_RESUMED "1": hold only in a resumed run (`--resume` among the arguments: a requeued job)
  DSTRAIN_PROBE_ONCE   "1": hold only if no rank has held in this DSTRAIN_PROBE_DIR before (a later
                       attempt of the same job goes on)
  DSTRAIN_PROBE_UNTIL  "stop" (default): let the phase go on once a stop is requested; "never": keep
                       holding (for a second Ctrl-C, which interrupts the hold itself)
"""

from __future__ import annotations

import os

PHASES = {  # phase -> (module, function) that the probe wraps
    "index": ("dstrain.training.prepare", "prepare"),
    "build": ("dstrain.training.setup", "build"),
    "reference": ("dstrain.training.setup", "reference_table"),
    "step0_eval": ("dstrain.training.loop", "evaluate_sets"),
    "eval": ("dstrain.training.loop", "evaluate_sets"),
    "save": ("dstrain.training.loop", "save_checkpoint"),
}


def hold() -> None:
    import time
    from pathlib import Path

    from dstrain.distributed import stop

    rank = os.environ.get("RANK", "0")
    (Path(os.environ["DSTRAIN_PROBE_DIR"]) / f"held.rank{rank}").write_text(str(os.getpid()))
    deadline = time.monotonic() + 300  # a hang guard: the test signals within seconds
    until_stop = os.environ.get("DSTRAIN_PROBE_UNTIL", "stop") == "stop"
    while time.monotonic() < deadline:
        request = stop._installed
        if until_stop and request is not None and request.requested:
            return
        time.sleep(0.05)


def wanted_attempt() -> bool:
    import sys
    from pathlib import Path

    if os.environ.get("DSTRAIN_PROBE_RESUMED") == "1" and "--resume" not in sys.argv:
        return False
    held_before = any(Path(os.environ["DSTRAIN_PROBE_DIR"]).glob("held.rank*"))
    return not (os.environ.get("DSTRAIN_PROBE_ONCE") == "1" and held_before)


def install(phase: str) -> None:
    import functools
    import importlib

    module_name, name = PHASES[phase]
    module = importlib.import_module(module_name)
    original = getattr(module, name)
    ranks = os.environ.get("DSTRAIN_PROBE_RANKS", "")
    holds_here = (not ranks or os.environ.get("RANK", "0") in ranks.split(",")) and wanted_attempt()
    target_call, calls = int(os.environ.get("DSTRAIN_PROBE_CALL", "1")), [0]

    @functools.wraps(original)
    def probed(*args, **kwargs):
        calls[0] += 1
        if holds_here and calls[0] == target_call:
            hold()
        return original(*args, **kwargs)

    setattr(module, name, probed)


def is_rank_process() -> bool:
    """A rank (launchers set RANK), or the one process of a single-process test; not a launcher."""
    return "RANK" in os.environ or os.environ.get("DSTRAIN_PROBE_SINGLE") == "1"


if os.environ.get("DSTRAIN_PROBE_PHASE") and is_rank_process():
    install(os.environ["DSTRAIN_PROBE_PHASE"])
