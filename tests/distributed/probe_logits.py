"""Launcher script for the tests: train with dstrain's own session, then record the live model's logits.

Run under `deepspeed --num_gpus 2 tests/distributed/probe_logits.py --config RUN.yaml`. After training, every
rank runs the same forward on a fixed batch through the engine's (possibly ZeRO-3-partitioned) model and
rank 0 writes `OUTPUT_DIR/probe_logits.safetensors`, for comparison with the saved adapter loaded by PEFT.
It also checks that dstrain's batched optimizer-state gather equals DeepSpeed's per-parameter
`safe_get_full_fp32_param` / `safe_get_full_optimizer_state` on every rank.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from dstrain.distributed import group
from dstrain.train import parse_args, resolve_config
from dstrain.training.loop import fit
from dstrain.training.setup import start


def probe_batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1234)
    input_ids = torch.randint(7, 2000, (3, 24), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, 17:] = 0  # one right-padded row
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def check_gather_matches_deepspeed(session) -> None:
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from dstrain.checkpoint.optim import gather_optimizer_state, trainable

    ours = gather_optimizer_state(session.engine, session.peft_model)
    for name, param in trainable(session.peft_model):
        theirs = {
            "fp32": safe_get_full_fp32_param(param),
            "exp_avg": safe_get_full_optimizer_state(param, "exp_avg"),
            "exp_avg_sq": safe_get_full_optimizer_state(param, "exp_avg_sq"),
        }
        for key, value in theirs.items():
            assert torch.equal(ours[f"{name}::{key}"], value.float().cpu()), f"{name}::{key} differs"


def main() -> None:
    args = parse_args(sys.argv[1:])
    cfg = resolve_config(args.config, args.overrides, args.ds_config)
    session, tally, state = start(cfg)
    fit(session, tally, state)
    session.sink.close()
    check_gather_matches_deepspeed(session)
    batch = probe_batch()
    session.peft_model.eval()  # the module itself: this probe reads logits outside the engine
    with torch.no_grad():
        logits = session.peft_model(**{k: v.to(session.engine.device) for k, v in batch.items()}).logits
    if session.rank == 0:
        save_file(
            {"logits": logits.float().cpu().contiguous(), **batch},
            str(Path(cfg.output_dir) / "probe_logits.safetensors"),
        )
    group.shutdown()


if __name__ == "__main__":
    main()
