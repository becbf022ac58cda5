"""How a test compares numbers that the same arithmetic did not produce in the same order.

torch picks its vectorised CPU kernels per machine (`ATEN_CPU_CAPABILITY`: default, avx2, avx512), BLAS and
oneDNN pick theirs (`MKL_ENABLE_INSTRUCTIONS`, `ONEDNN_MAX_CPU_ISA`), and even `torch.randn` fills through
them: the same fp32 sums are then added in another order and the last bits move. A test that asserts those
bits passes on the machine that wrote it and fails on the next one. Three kinds of comparison:

- Bitwise (plain `==`, `torch.equal`): the same computation twice on the same machine inside one test (an
  uninterrupted run and a killed-and-resumed one, 1 rank or 2). Nothing here: any difference is a bug.
- Against a record another process wrote, maybe on another CPU (the golden run dirs):
  `assert_close_to_record`, relative `REL_PER_STEP` per training step. One fp32 step rounds its loss and
  update at ~1e-7 relative; the rounding of each step feeds the next, so the bound grows with the steps.
  Measured: 3e-8 after 3 steps between an AVX-512 and an AVX2 machine (issue 32), 1e-6 leaves 30x room.
- Across computation orders in one test (N ranks vs 1, sequence parallel vs not, chunked vs whole):
  `assert_steps_close` for per-step scalars, `assert_tensors_close` / `assert_state_close` for tensors, which
  compare the whole tensor (norm of the difference against the norm of the reference): an entry near zero
  that came out of cancelling terms carries the error of those terms, so no per-entry bound fits it.

Every failure message prints both values and their relative difference. With DSTRAIN_NUMERICS_LOG=FILE set,
every comparison here also appends its measured difference and bound to FILE as a JSON line, passing or
not: that is how the margins quoted beside each tolerance are measured (README, Tests).
"""

from __future__ import annotations

import json
import math
import os
import platform
from collections.abc import Mapping
from pathlib import Path

REL_PER_STEP = 1e-6
KERNEL_SWITCHES = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA")


def _log(what: str, measured: float, bound: float) -> None:
    """One JSON line per comparison to $DSTRAIN_NUMERICS_LOG, if set: the measured difference and its bound
    in the comparison's own unit, and `used`, their ratio (1 is the edge)."""
    path = os.environ.get("DSTRAIN_NUMERICS_LOG")
    if path:
        used = measured / bound if bound > 0 else (0.0 if measured == 0 else math.inf)
        test = os.environ.get("PYTEST_CURRENT_TEST", "").removesuffix(" (call)")
        row = {"test": test, "what": what, "measured": measured, "bound": bound, "used": used}
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")


def relative_difference(got: float, want: float) -> float:
    """|got - want| / |want|; 0 for equal values, inf for a non-zero value against an exact zero."""
    if got == want:
        return 0.0
    if want == 0 or not (math.isfinite(got) and math.isfinite(want)):
        return math.inf
    return abs(got - want) / abs(want)


def record_tolerance(step: int) -> float:
    """The relative bound at `step` of a run (counted from 1) against a run recorded on another machine."""
    return REL_PER_STEP * max(step, 1)


def _same_steps(got: Mapping[int, float], want: Mapping[int, float], what: str) -> None:
    assert sorted(got) == sorted(want), f"{what}: steps {sorted(got)}, expected {sorted(want)}"


def _report(what: str, failures: list[str]) -> None:
    assert not failures, f"{what}:\n  " + "\n  ".join(failures)


def _line(label: str, got: float, want: float, bound: str, rel: float) -> str:
    return f"{label}: got {got!r}, expected {want!r}, relative difference {rel:.2e} > {bound}"


def assert_close_to_record(got: Mapping[int, float], recorded: Mapping[int, float], what: str) -> None:
    """Per step, `got` (computed here) within `record_tolerance(step)` of `recorded` (written elsewhere)."""
    _same_steps(got, recorded, what)
    failures = []
    for step, want in sorted(recorded.items()):
        rel = relative_difference(got[step], want)
        _log(f"{what}: step {step}", rel, record_tolerance(step))
        if rel > record_tolerance(step):
            bound = f"{record_tolerance(step):.1e} ({REL_PER_STEP:.0e} per step x {step} steps)"
            failures.append(_line(f"step {step}", got[step], want, bound, rel))
    _report(f"{what} (recorded on another machine or by another process)", failures)


def assert_steps_close(
    got: Mapping[int, float], want: Mapping[int, float], what: str, rel: float, abs_tol: float = 0.0
) -> None:
    """Per step, |got - want| <= max(rel x |want|, abs_tol): the same numbers summed in another order.
    `abs_tol` only for values that are differences of much larger terms (reward margins)."""
    _same_steps(got, want, what)
    failures = []
    for step, expected in sorted(want.items()):
        allowed = max(rel * abs(expected), abs_tol)
        _log(f"{what}: step {step} (absolute)", abs(got[step] - expected), allowed)
        if not abs(got[step] - expected) <= allowed:  # `not <=`: a NaN fails
            bound = f"{rel:.0e}" + (f" (or {abs_tol:.0e} absolute)" if abs_tol else "")
            failures.append(
                _line(f"step {step}", got[step], expected, bound, relative_difference(got[step], expected))
            )
    _report(what, failures)


def tensor_difference(got, want) -> str | None:
    """None if `got` matches `want` in shape and dtype, else why not."""
    if got.shape != want.shape or got.dtype != want.dtype:
        return f"shape/dtype {tuple(got.shape)} {got.dtype}, expected {tuple(want.shape)} {want.dtype}"
    return None


def norm_relative_error(got, want) -> float:
    """||got - want|| / ||want|| in float64 (0 when both are exactly zero)."""
    import torch

    diff = torch.linalg.vector_norm((got.double() - want.double()).flatten()).item()
    scale = torch.linalg.vector_norm(want.double().flatten()).item()
    if diff == 0:
        return 0.0
    return diff / scale if scale > 0 else math.inf


def _tensor_failure(name: str, got, want, rel: float) -> str | None:
    mismatch = tensor_difference(got, want)
    if mismatch:
        return f"{name}: {mismatch}"
    error = norm_relative_error(got, want)
    _log(name, error, rel)
    if error <= rel:
        return None
    delta = (got.double() - want.double()).abs().flatten()
    worst = int(delta.argmax())
    return (
        f"{name}: ||got - expected|| / ||expected|| = {error:.2e} > {rel:.0e} "
        f"(largest entry difference {delta[worst].item():.2e} at flat index {worst}: "
        f"got {got.flatten()[worst].item()!r}, expected {want.flatten()[worst].item()!r})"
    )


def assert_tensors_close(got, want, rel: float, what: str) -> None:
    """The whole of `got` within `rel` of `want`: ||got - want|| <= rel x ||want||."""
    failure = _tensor_failure(what, got, want, rel)
    assert failure is None, failure


def assert_state_close(got: Mapping, want: Mapping, rel: float, what: str) -> None:
    """Every tensor of a state dict (adapter, optimizer) within `rel` of the other's, by norm."""
    assert got.keys() == want.keys(), f"{what}: keys {sorted(got)} != {sorted(want)}"
    failures = [_tensor_failure(key, got[key], want[key], rel) for key in want]
    _report(what, [f for f in failures if f])


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_facts() -> dict:
    """What decides the last bits of numbers computed in this process and its children (which inherit its
    environment, so their torch picks the same kernels): the CPU, torch's ATen capability, the kernel
    switches set, the versions. Written beside recorded numbers (golden run dirs, bench results)."""
    from importlib.metadata import version

    import torch

    return {
        "cpu": cpu_model(),
        "architecture": platform.machine(),
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "kernel_switches": {name: os.environ[name] for name in KERNEL_SWITCHES if name in os.environ},
        "torch": torch.__version__,
        "deepspeed": version("deepspeed"),
        "python": platform.python_version(),
    }
