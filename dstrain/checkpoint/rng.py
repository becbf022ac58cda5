"""Random number generators: seeding, and their full state as tensors + JSON (never a pickle).

A checkpoint stores every rank's python, numpy and torch (CPU and accelerator) generator state, so a resumed
run draws the same dropout masks as one that never stopped.
"""

from __future__ import annotations

import json
import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """This process's generator states as (tensors, string metadata) for a safetensors file."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {
        "python_mt": torch.tensor(mt, dtype=torch.int64),
        "numpy_keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "torch_cpu": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{index}"] = state
    meta = {
        "python": json.dumps({"version": version, "gauss": gauss}),
        "numpy": json.dumps({"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "cached": cached}),
    }
    return tensors, meta


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    python = json.loads(meta["python"])
    random.setstate((python["version"], tuple(tensors["python_mt"].tolist()), python["gauss"]))
    numpy = json.loads(meta["numpy"])
    keys = tensors["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state((numpy["kind"], keys, numpy["pos"], numpy["has_gauss"], numpy["cached"]))
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        names = [k for k in tensors if k.startswith("torch_cuda_")]
        cuda = [tensors[k] for k in sorted(names, key=lambda k: int(k.rsplit("_", 1)[1]))]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
