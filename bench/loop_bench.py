"""Loop overhead: dstrain's `loop.fit()` vs a bare engine loop, same engine, same batches, 2 ranks.

    python bench/loop_bench.py                # full: 60 steps x 5 alternating repetitions per variant
    python bench/loop_bench.py --quick        # 10 steps x 2 repetitions, about a minute

One `deepspeed --num_gpus N bench/loop_bench.py --rank-job ...` launch. On every rank it builds the normal
session with `dstrain.training.setup.start()` (the model, the ZeRO-2 engine over SupervisedLM, the loader) from a run
config on generated SFT RAG data and a random-init Qwen2-shaped model (hidden 256, 4 layers, vocab 3,000),
takes `--steps` optimizer steps' worth of micro batches from the session's loader once, and then times, on
those same MicroBatches, alternately:

  dstrain   dstrain.training.loop.fit(session, tally, state): meter, the per-step stop/NaN all-reduce, logging every
            `--log-every` steps (metrics.jsonl, TensorBoard, grad norm), LR lookups; the end-of-run
            checkpoint is switched off (save is the checkpoint benchmark's business, not loop overhead)
  bare      for batch: loss = sft_loss(*engine(**batch.inputs)); engine.backward(loss); engine.step()

Both continue training the same engine (each repetition costs the same work). A barrier precedes every
timed block; rank 0's wall time is reported. `--warmup` untimed bare steps run first. Printed: every
repetition's seconds, the medians, and dstrain/bare (target: <= 1.03).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common as bc
import bench_model as bm
import bench_report as br
import bench_workload as bw


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="10 steps x 2 repetitions, toy model")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per timed repetition")
    parser.add_argument("--repeats", type=int, default=5, help="repetitions per variant (alternating order)")
    parser.add_argument(
        "--warmup", type=int, default=5, help="untimed bare steps before the first repetition"
    )
    parser.add_argument("--log-every", type=int, default=10, help="dstrain's train.log_every (its default)")
    parser.add_argument("--records", type=int, default=2000)
    parser.add_argument("--vocab", type=int, default=3000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--micro", type=int, default=4)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--timeout", type=int, default=1800)
    parser.add_argument("--work-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="cProfile one extra dstrain repetition on rank 0, print the top functions",
    )
    parser.add_argument("--rank-job", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.repeats, args.warmup, args.records = 10, 2, 2, 200
        args.log_every = min(args.log_every, 5)
    return args


# ------------------------------------------------------------------------------------------- on each rank


def bare_loop(engine: Any, batches: list[Any]) -> None:
    """The reference: what a hand-rolled DeepSpeed loop does, and nothing more.

    The forward goes through `dstrain.engine.forward`, the thin wrapper that moves the batch to the device
    and adds the host-side labelled-position index SupervisedLM takes: without it the module would find
    the positions itself (a device sync), and the two variants would not do the same model work.
    """
    from dstrain import engine as eng
    from dstrain.objectives.losses import sft_loss

    for batch in batches:
        loss = sft_loss(*eng.forward(engine, batch.inputs))
        engine.backward(loss)
        engine.step()


def rank_job(spec_path: Path) -> None:
    import torch

    from dstrain import engine
    from dstrain.distributed import collectives, group
    from dstrain.train import resolve_config
    from dstrain.training import loop
    from dstrain.training.setup import start

    spec = json.loads(spec_path.read_text(encoding="utf-8"))
    cfg = resolve_config(spec["config"], [], None)
    session, tally, state0 = start(cfg)
    per_rep = spec["steps"] * session.plan.accumulation
    # The same DataLoader output for both variants: materialised once, replayed every repetition.
    batches = [next(session.batches) for _ in range(per_rep)]
    loop.save = lambda run, state: None  # no end-of-run checkpoint inside the timed loop

    def run_dstrain() -> None:
        replayed = dataclasses.replace(session, batches=iter(batches), total_steps=spec["steps"])
        loop.fit(replayed, copy.deepcopy(tally), copy.deepcopy(state0))

    def run_bare() -> None:
        engine.train_mode(session.engine)  # as loop.fit() does: dropout on (from_pretrained leaves eval)
        bare_loop(session.engine, batches)

    engine.train_mode(session.engine)
    bare_loop(session.engine, batches[: spec["warmup"] * session.plan.accumulation])
    times: dict[str, list[float]] = {"dstrain": [], "bare": []}
    for rep in range(spec["repeats"]):
        order = ["dstrain", "bare"] if rep % 2 == 0 else ["bare", "dstrain"]
        for name in order:
            collectives.barrier()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            started = time.perf_counter()
            (run_dstrain if name == "dstrain" else run_bare)()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            collectives.barrier()
            times[name].append(time.perf_counter() - started)
    if spec.get("profile"):
        import cProfile
        import io
        import pstats

        profiler = cProfile.Profile()
        profiler.enable()
        run_dstrain()
        profiler.disable()
        if session.rank == 0:
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(30)
            Path(spec["result"]).with_suffix(".profile.txt").write_text(text.getvalue(), encoding="utf-8")
    session.sink.close()
    session.stop.uninstall()
    if session.rank == 0:
        Path(spec["result"]).write_text(json.dumps(times), encoding="utf-8")
    group.shutdown()


# ------------------------------------------------------------------------------------------- driver


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.rank_job:
        rank_job(args.rank_job)
        return
    import yaml

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dstrain-loop-bench-") as tmp:
        work_dir = args.work_dir or Path(tmp)
        work_dir.mkdir(parents=True, exist_ok=True)
        data = bw.write_sft_records(work_dir / "sft.jsonl", args.records, seed=0)
        model = bm.write_model(
            work_dir / f"model-v{args.vocab}", "qwen2", args.vocab, args.hidden, args.layers, args.dtype
        )
        # the scheduler spans every step the engine will take, so the LR never runs off its end
        total = args.warmup + (2 * args.repeats + 1) * args.steps
        ds = bc.resolved_ds_config(args.micro, args.nproc, total, lr=2e-4, bf16=args.dtype == "bf16")
        br.save_results(work_dir / "ds.json", ds)
        work = bw.Workload(
            data=str(data),
            model=str(model),
            ds_config=str(work_dir / "ds.json"),
            steps=args.steps,
            warmup=0,
            micro=args.micro,
            dtype=args.dtype,
        )
        raw = bc.dstrain_config(work, work_dir / "run", "sft", {"train.log_every": args.log_every})
        config = work_dir / "loop.yaml"
        config.write_text(yaml.safe_dump(raw), encoding="utf-8")
        result = work_dir / "loop.result.json"
        spec = {
            "config": str(config),
            "steps": args.steps,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "result": str(result),
            "profile": args.profile,
        }
        spec_path = work_dir / "loop.spec.json"
        spec_path.write_text(json.dumps(spec), encoding="utf-8")
        print(br.machine_line(), flush=True)
        cmd, env = bc.deepspeed_launch(
            [str(Path(__file__).resolve()), "--rank-job", str(spec_path)], args.nproc
        )
        bc.run_job(cmd, work_dir / "loop.log", args.timeout, env=env)
        times = json.loads(result.read_text(encoding="utf-8"))
        profile = result.with_suffix(".profile.txt")
        if profile.is_file():
            print(profile.read_text(encoding="utf-8"))
    medians = {name: statistics.median(values) for name, values in times.items()}
    rows = [
        [
            name,
            " ".join(f"{t:.2f}" for t in values),
            f"{medians[name]:.2f}",
            f"{1000 * medians[name] / args.steps:.1f}",
        ]
        for name, values in times.items()
    ]
    br.print_table(
        f"Loop: {args.steps} steps per repetition, {args.repeats} repetitions each (alternating), "
        f"micro {args.micro} x {args.nproc} ranks, vocab {args.vocab}",
        ["variant", "seconds per repetition", "median s", "median ms/step"],
        rows,
    )
    print(f"dstrain/bare (median): {medians['dstrain'] / medians['bare']:.3f}  (target: <= 1.03)")
    print(f"{br.load_line()}; total {time.perf_counter() - started:.0f} s")
    if args.out:
        br.save_results(
            args.out, {"machine": br.machine_line(), "args": vars(args), "times": times, "medians": medians}
        )


if __name__ == "__main__":
    main()
