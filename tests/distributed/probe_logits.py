"""Launcher script for the tests: train with dstrain's own session, then record the live model's logits.

Run under `deepspeed --num_gpus 2 tests/distributed/probe_logits.py --config RUN.yaml`. After training, every
rank runs the same forward on a fixed batch through the engine's (possibly ZeRO-3-partitioned) model and
rank 0 writes `OUTPUT_DIR/probe_logits.safetensors`, for comparison with the saved adapter loaded by PEFT.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from dstrain import distributed
from dstrain.loop import train
from dstrain.train import parse_args, resolve_config, start


def probe_batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1234)
    input_ids = torch.randint(7, 2000, (3, 24), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, 17:] = 0  # one right-padded row
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def main() -> None:
    args = parse_args(sys.argv[1:])
    cfg = resolve_config(args.config, args.overrides, args.ds_config)
    session, state = start(cfg)
    train(session, state)
    session.sink.close()
    batch = probe_batch()
    session.engine.eval()
    with torch.no_grad():
        logits = session.peft_model(**{k: v.to(session.engine.device) for k, v in batch.items()}).logits
    if session.rank == 0:
        save_file(
            {"logits": logits.float().cpu().contiguous(), **batch},
            str(Path(cfg.output_dir) / "probe_logits.safetensors"),
        )
    distributed.shutdown()


if __name__ == "__main__":
    main()
