"""dstrain: LoRA/QLoRA fine-tuning for retrieval-augmented generation inside DeepSpeed ZeRO."""

import logging as _logging

from dstrain import lean_imports as _lean_imports

__version__ = "0.2.0.dev0"

# The libraries whose versions decide whether a checkpoint's numbers can be reproduced: recorded in every
# checkpoint and shown by `dstrain --version --verbose`.
TRACKED_PACKAGES = ("torch", "deepspeed", "transformers", "peft", "safetensors")

# PEFT imports bitsandbytes whenever it is installed, and bitsandbytes then warns on CPUs with AVX512-BF16
# that the optional `kernels` package is missing; it falls back to its own CPU kernel. Nothing to act on,
# and it would print at the start of every run: quieted before anything imports PEFT.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)

# deepspeed's imports of mlflow (autotuning) and Muon (ZeRO's optimizer list): seconds of every rank's start-up
# for features dstrain does not use (dstrain/lean_imports.py).
_lean_imports.install()


def package_versions() -> dict[str, str]:
    """{"dstrain": __version__, and each tracked package that is installed: its version}.

    Read from the installed metadata, nothing imported: `dstrain --version --verbose` stays instant.
    """
    from importlib.metadata import PackageNotFoundError, version

    found = {"dstrain": __version__}
    for name in TRACKED_PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def version_text(verbose: bool = False) -> str:
    """`dstrain --version`: one line; with `verbose`, one more line per tracked package."""
    lines = [f"dstrain {__version__}"]
    if verbose:
        installed = package_versions()
        lines += [f"  {name} {installed.get(name, 'not installed')}" for name in TRACKED_PACKAGES]
    return "\n".join(lines)
