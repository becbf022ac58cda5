"""The embedded demo behind a bare `dstrain train`: bundled tiny model, bundled RAG data, one process."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any


def asset(*parts: str) -> str:
    return str(Path(str(resources.files("dstrain") / "assets")).joinpath(*parts))


def demo_config() -> dict[str, Any]:
    """A run config dict: SFT on the bundled retrieval-grounded QA set, ZeRO-2, fp32, a couple of minutes."""
    return {
        "model": {"path": "builtin:tiny", "dtype": "fp32"},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
        "data": {
            "train": [asset("data", "sft_rag_train.jsonl")],
            "eval": [asset("data", "sft_rag_eval.jsonl")],
            "format": "sft-rag",
            "max_seq_len": 256,
            "max_passage_tokens": 192,
            "max_eval_samples": 64,
        },
        "train": {"epochs": 1, "log_every": 5, "eval_every": 25, "save_every": 50, "keep_last": 2},
        "ds_config": asset("demo", "ds_config.json"),
        "output_dir": "runs/demo",
    }
