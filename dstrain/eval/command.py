"""`dstrain eval PATH --data FILE...`: a checkpoint, run, exported adapter or merged model on any eval set.

    dstrain eval runs/x --data eval.jsonl [--format F] [--generate N] [--json] [--out F] [--num-gpus N]
    python -m dstrain.eval.command ...     (each rank, when `--num-gpus` starts the deepspeed launcher)

The model is loaded as the run had it (eval/source.py) and scored by the run's own eval code: `eval.loss`
(token-weighted eval_loss; for preference data the objective's loss per pair, preference accuracy and reward
margin) and `eval.generation` (greedy answers, exact match and token F1). No DeepSpeed engine: the module
runs alone, cast as the engine casts it (engine.LocalEngine), so on the run's own eval file the numbers are
the ones the run logged at that checkpoint's step. With several ranks each scores its share, as in training.
The report is written as JSON next to what was evaluated (or to --out) and printed as a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dstrain.errors import ConfigError, DataError, DstrainError
from dstrain.eval.source import MERGED, EvalSource

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from dstrain.config.run import RunConfig
    from dstrain.distributed.env import DistEnv


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m dstrain.eval.command", description=__doc__)
    parser.add_argument("path", help="a run dir, checkpoint dir, exported adapter dir or merged model dir")
    parser.add_argument("--data", nargs="+", action="extend", required=True, help="eval files or globs")
    parser.add_argument("--format", help="preference | sft-rag | messages (default: the run's)")
    parser.add_argument("--generate", type=int, default=0, help="greedy answers for this many records")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    parser.add_argument("--out", type=Path, help="the report's path (default: next to PATH)")
    parser.add_argument("--config", type=Path, help="run YAML for an adapter or model dir")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from transformers.utils import logging as hf_logging

    from dstrain.distributed.failures import report_error
    from dstrain.distributed.group import shutdown
    from dstrain.metrics.console import json_stdout

    args = parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation chatter, as in training
    hf_logging.disable_progress_bar()  # a report, not loader progress bars
    try:
        with json_stdout(args.json) as out:
            report, env = evaluate_source(args)
        if env.is_main:
            show(report, args.json, out)
    except DstrainError as exc:
        return report_error(exc, args.debug)
    finally:
        shutdown()
    return 0


def evaluate_source(args: argparse.Namespace) -> tuple[dict[str, Any], DistEnv]:
    """Resolve PATH, read the data, load the model, score it; rank 0 writes the report."""
    from dstrain.eval.source import describe, find_source
    from dstrain.model.build import load_tokenizer
    from dstrain.model.quant import bitsandbytes_kept_out
    from dstrain.training.prepare import check_chat_template

    if args.generate < 0:
        raise DstrainError(f"--generate must be 0 or more, got {args.generate}")
    source = find_source(Path(args.path), args.config, args.overrides)
    for note in source.notes:  # broken newer checkpoints passed over
        print(f"warning: {note}", file=sys.stderr)
    cfg = eval_config(source.cfg, args.data, args.format)
    files = data_files(cfg)  # a missing file is said as such, before any record is read
    if source.kind == MERGED and cfg.data.format == "preference":
        raise DstrainError(
            f"{source.path} is a merged model: preference metrics compare it with the base it came from, which "
            "it no longer holds; evaluate the checkpoint or the exported adapter instead"
        )
    with bitsandbytes_kept_out(cfg.model.load_in_4bit):
        tokenizer = load_tokenizer(cfg.model)
        check_chat_template(cfg, tokenizer)
        examples = read_examples(tokenizer, cfg)
        env = join(cfg)
        metrics = score(replace(source, cfg=cfg), tokenizer, examples, args.generate, env)
    report = {
        "source": describe(replace(source, cfg=cfg)),
        "data": [str(p) for p in files],
        "records": len(examples),
        "generated": min(args.generate, len(examples)),
        "world_size": env.world_size,
        "metrics": metrics,
        "logged": logged_metrics(source, cfg),
    }
    if cfg.data.max_eval_samples and len(examples) == cfg.data.max_eval_samples:
        report["note"] = (
            f"the first {len(examples)} records only (data.max_eval_samples in the config); "
            "--set data.max_eval_samples=0 scores them all"
        )
    if env.is_main:
        report["report"] = str(write_report(report, args.out or default_report_path(source.path, files)))
    return report, env


def eval_config(cfg: RunConfig, data: list[str], fmt: str | None) -> RunConfig:
    """The run config with the eval set and format of this command."""
    if fmt is not None and fmt not in ("preference", "sft-rag", "messages"):
        raise ConfigError(
            [f"--format must be preference, sft-rag or messages, got {fmt!r}"], source="arguments"
        )
    return replace(cfg, data=replace(cfg.data, eval=list(data), format=fmt or cfg.data.format))


def data_files(cfg: RunConfig) -> list[Path]:
    from dstrain.data.records import expand_paths

    return expand_paths(cfg.data.eval, "--data")


def read_examples(tokenizer: PreTrainedTokenizerBase, cfg: RunConfig) -> list:
    """The eval set tokenised as the run tokenises its own (training.prepare.load_eval_set)."""
    from dstrain.training.prepare import load_eval_set

    try:
        return load_eval_set(tokenizer, cfg, list(cfg.data.eval), "--data")
    except DataError as exc:
        raise DataError(
            f"{exc}\n(read as {cfg.data.format} records: is --format right for these files?)"
        ) from None


def join(cfg: RunConfig) -> DistEnv:
    """This rank's place: one local process, or the process group the launcher's ranks form (with the
    JIT-op cache and stale-lock clean-up a training rank has, training.setup.open_process)."""
    from dstrain.distributed import buildlocks
    from dstrain.distributed.env import read_env
    from dstrain.distributed.group import init_process_group
    from dstrain.training.setup import is_cpu, say_op_build

    env = read_env()
    buildlocks.use_install_cache()  # before any op loads: one JIT-op cache per DeepSpeed install
    if not env.is_distributed:
        return env
    if env.local_rank == 0:
        for verdict in buildlocks.clear_stale():
            print(f"warning: {verdict.note}", file=sys.stderr)
        if is_cpu():  # DeepSpeed's CPU collectives load their op at the rendezvous
            say_op_build("deepspeed_shm_comm")
    timeouts = cfg.distributed
    return init_process_group(env, timeouts.rendezvous_timeout_s, timeouts.collective_timeout_s)


def score(
    source: EvalSource, tokenizer: PreTrainedTokenizerBase, examples: list, generate: int, env: DistEnv
) -> dict[str, float]:
    """eval.loss (and eval.generation) on the model alone, each rank its share; the same on every rank."""
    from dstrain import engine
    from dstrain.distributed.collectives import agreed
    from dstrain.eval.generation import GenerationEval, evaluate_generation, generation_items
    from dstrain.eval.loss import evaluate
    from dstrain.eval.source import load_policy
    from dstrain.model.build import DTYPES
    from dstrain.model.supervised import SupervisedLM

    cfg, micro = source.cfg, source.micro
    with agreed("loading the model"):  # a rank that cannot load it fails every rank at once
        policy = load_policy(source)
        lm = SupervisedLM(
            policy, cfg.model.logits_chunk_tokens, cfg.model.head, cfg.model.router_aux_loss_coef
        )
        local = engine.LocalEngine(lm, DTYPES[cfg.model.dtype])
    pad = tokenizer.pad_token_id
    result = evaluate(
        local, examples, micro, env.rank, env.world_size, pad, cfg.objective, cfg.data.share_prompt
    )
    if generate:
        items = generation_items(examples, tokenizer, generate)
        gen = GenerationEval(tokenizer, {"": items}, cfg.train.eval_max_new_tokens, synced=False)  # one set
        with engine.evaluating(local):
            result |= evaluate_generation(policy, gen, micro, env.rank, env.world_size)
    return result


def logged_metrics(source: EvalSource, cfg: RunConfig) -> dict[str, float] | None:
    """The eval row the run logged at the checkpoint's step, when this eval is on the run's own eval set."""

    if source.run_dir is None or source.step is None or not source.cfg.data.eval:
        return None
    name = same_eval_set(source.cfg, data_files(cfg))
    if name is None or cfg.data.format != source.cfg.data.format:
        return None
    suffix = f"/{name}" if name else ""
    rows = [
        row
        for row in read_metrics(source.run_dir)
        if row.get("step") == source.step and f"eval_loss{suffix}" in row
    ]
    if not rows:
        return None
    # a named set's own keys (eval_loss/rag), read back as the plain keys this report uses
    row = rows[-1].items()
    if not suffix:
        return {k: v for k, v in row if k.startswith("eval_") and "/" not in k}
    return {k[: -len(suffix)]: v for k, v in row if k.startswith("eval_") and k.endswith(suffix)}


def same_eval_set(run_cfg: RunConfig, files: list[Path]) -> str | None:
    """The name of the run's eval set ("" for a plain list) whose files are `files`, else None."""
    from dstrain.data.records import expand_paths

    wanted = [p.resolve() for p in files]
    for name, patterns in run_cfg.data.eval_sets().items():
        try:
            if [p.resolve() for p in expand_paths(patterns, "data.eval")] == wanted:
                return name
        except DataError:  # the run's eval files are gone: nothing to compare with
            continue
    return None


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines() if path.is_file() else []:
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue  # a line cut short by a killed run
    return rows


def default_report_path(evaluated: Path, files: list[Path]) -> Path:
    """`<dir>.eval-<first data file's stem>.json` beside the evaluated dir (inside it would break a
    checkpoint's manifest check)."""
    stem = files[0].stem
    return evaluated.parent / f"{evaluated.name}.eval-{stem}.json"


def write_report(report: dict[str, Any], path: Path) -> Path:
    from dstrain.checkpoint.atomic import write_text_atomic

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    except OSError as exc:
        raise DstrainError(
            f"cannot write the eval report to {path} ({exc.strerror or exc}); pass --out FILE"
        ) from None
    return path


def show(report: dict[str, Any], as_json: bool, out: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    from dstrain.metrics.console import print_json

    if as_json:
        print_json(report, out)
        return
    source, logged = report["source"], report["logged"]
    step = f" (step {source['step']})" if source["step"] is not None else ""
    table = Table(
        title=f"eval of {source['kind']} {source['path']}{step}", title_justify="left", show_edge=False
    )
    table.add_column("metric")
    table.add_column("value", justify="right")
    if logged:
        table.add_column(f"logged at step {source['step']}", justify="right")
    for name, value in report["metrics"].items():
        row = [name, f"{value:.6g}"] + ([f"{logged[name]:.6g}" if name in logged else "-"] if logged else [])
        table.add_row(*row)
    console = Console(file=out, soft_wrap=not out.isatty())
    console.print(table)
    data = ", ".join(report["data"])
    console.print(
        f"{report['records']} records of {data} ({source['data']['format']}); report {report['report']}"
    )
    if "note" in report:
        console.print(f"note: {report['note']}")


if __name__ == "__main__":
    sys.exit(main())
