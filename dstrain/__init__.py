"""dstrain: LoRA/QLoRA fine-tuning for retrieval-augmented generation inside DeepSpeed ZeRO."""

import logging as _logging

__version__ = "0.1.0"

# PEFT imports bitsandbytes whenever it is installed, and bitsandbytes then warns on CPUs with AVX512-BF16
# that the optional `kernels` package is missing; it falls back to its own CPU kernel. Nothing to act on,
# and it would print at the start of every run: quieted before anything imports PEFT.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
