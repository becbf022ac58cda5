"""A probe that freezes ranks of a dstrain run at chosen steps: the rank stops itself with a real SIGSTOP
(alive, its sockets open, silent: what a hung file system read or a debugger leaves), at the same point of
every run, so no test guesses the run's timing.

Put this directory on PYTHONPATH (Python imports `sitecustomize` at start-up, in every process the
launchers start) and set:
  DSTRAIN_FREEZE      RANK:STEPS[,RANK:STEPS...]: rank RANK stops once STEPS optimizer steps are done, in
                      the next step, before its optimizer step (the other ranks then wait for it in a
                      collective). "0:2,1:4": rank 0 stops in step 3, rank 1 in step 5.
  DSTRAIN_FREEZE_DIR  where `frozen.rank<R>` (holding the rank's pid) appears just before it stops
The test resumes (SIGCONT) or kills the process. A process stops once.
"""

from __future__ import annotations

import os


def install(after: int, marker: str) -> None:
    import signal

    from dstrain import engine

    original, stopped = engine.step, [False]

    def step(ds_engine):
        if not stopped[0] and ds_engine.global_steps >= after:
            stopped[0] = True
            with open(marker, "w", encoding="utf-8") as f:
                f.write(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGSTOP)
        return original(ds_engine)

    engine.step = step


def steps_before_freeze() -> int | None:
    """For a rank (launchers set RANK; a launcher is never frozen): its STEPS in DSTRAIN_FREEZE, if any."""
    plan = dict(item.split(":") for item in os.environ.get("DSTRAIN_FREEZE", "").split(",") if item)
    return int(plan[os.environ["RANK"]]) if os.environ.get("RANK") in plan else None


if (after := steps_before_freeze()) is not None:
    install(after, f"{os.environ['DSTRAIN_FREEZE_DIR']}/frozen.rank{os.environ['RANK']}")
