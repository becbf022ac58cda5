"""One training run in this process: prints estimated and measured peak RSS growth per rank as JSON.

python tests/integration/memory_probe.py RUN.yaml   (also under `deepspeed --num_gpus N`)
Growth is measured from just before the model is built to the high-water mark at the end of training.
"""

from __future__ import annotations

import json
import os
import sys

from dstrain.config.run import load_config
from dstrain.model import build as model
from dstrain.model import memory
from dstrain.training.loop import fit
from dstrain.training.setup import start


def main(config: str) -> None:
    seen: dict = {}
    build = model.build_model

    def measured_build(*args, **kwargs):  # type: ignore[no-untyped-def]
        seen["before"] = memory.rss_bytes()
        memory.reset_peak_rss()
        peft_model = build(*args, **kwargs)
        seen["shape"] = memory.model_shape(peft_model)  # before ZeRO-3 partitions it
        return peft_model

    model.build_model = measured_build
    cfg = load_config(config)
    session, tally, state = start(cfg)
    fit(session, tally, state)
    peak = memory.rss_bytes("VmHWM")
    setup = memory.setup_from(cfg, session.ds, session.plan.micro, session.plan.world)
    report = {
        "rank": session.rank,
        "measured": peak - seen["before"],
        "estimated": memory.peak_estimate(seen["shape"], setup),
        "terms": {t.name: t.bytes for t in memory.estimate(seen["shape"], setup)},
    }
    print("MEMORY " + json.dumps(report), flush=True)
    session.sink.close()
    from dstrain.distributed import group

    group.shutdown()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main(sys.argv[1])
