"""Start-up: the per-phase clock, where its numbers go, and the notice before DeepSpeed compiles an op."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dstrain import engine
from dstrain.distributed import buildlocks
from dstrain.metrics.sinks import MetricsSink, tb_tag
from dstrain.training import setup
from dstrain.training.phases import StartupClock

ROW = {"step": 1, "loss": 2.0, "lr": 1e-4, "tokens_per_s": 10.0}


def test_clock_books_each_lap_since_the_previous_one(monkeypatch):
    times = iter([10.0, 11.5, 11.5, 14.0])
    monkeypatch.setattr("dstrain.training.phases.time.time", lambda: next(times))
    clock = StartupClock(last=10.0)
    clock.lap("imports")  # 10.0 -> 10.0
    clock.lap("config")  # 11.5
    clock.lap("config")  # +0
    clock.lap("engine")  # 14.0
    assert clock.seconds == {"imports": 0.0, "config": 1.5, "engine": 2.5}
    assert (
        clock.line()
        == "start-up 4.0 s to the first optimizer step: imports 0.0 s, config 1.5 s, engine 2.5 s"
    )
    assert clock.row() == {
        "startup_imports_s": 0.0,
        "startup_config_s": 1.5,
        "startup_engine_s": 2.5,
        "startup_total_s": 4.0,
    }


def test_the_clock_of_a_process_starts_when_the_process_did():
    import time

    import psutil

    started = psutil.Process().create_time()  # this pytest process may have run for an hour already
    clock = StartupClock.since_process_start()
    before = time.time()
    clock.lap("imports")
    after = time.time()
    assert before - started <= clock.seconds["imports"] <= after - started


def test_the_sink_says_the_phases_at_the_first_step_and_logs_them_with_the_first_train_row(tmp_path, capsys):
    sink = MetricsSink(tmp_path, total_steps=2, enabled=True)
    clock = StartupClock()
    clock.lap("data index")
    sink.time_first_step(clock)
    sink.log({"step": 0, "eval_loss": 3.0})  # an eval before the first step carries none of it
    sink.advance(1)
    sink.log(ROW)
    sink.advance(2)
    sink.log({**ROW, "step": 2})
    sink.close()
    out = capsys.readouterr().out
    assert out.count("start-up ") == 1 and "data index" in out and "first step" in out
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [sorted(k for k in r if k.startswith("startup_")) for r in rows] == [
        [],
        ["startup_data_index_s", "startup_first_step_s", "startup_total_s"],
        [],
    ]
    assert tb_tag("startup_engine_s") == "startup/engine_s" and tb_tag("eval_loss") == "eval/loss"


def test_other_ranks_say_and_log_nothing(tmp_path, capsys):
    sink = MetricsSink(tmp_path, total_steps=1, enabled=False)
    sink.time_first_step(StartupClock())
    sink.advance(1)
    sink.log(ROW)
    assert capsys.readouterr().out == "" and not (tmp_path / "metrics.jsonl").exists()


@pytest.fixture
def fresh_machine(tmp_path, monkeypatch) -> Path:
    """An empty torch extensions cache and a DeepSpeed install without prebuilt ops."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr("deepspeed.git_version_info.installed_ops", {})
    return tmp_path


def test_a_first_build_is_announced_with_its_rough_length(fresh_machine, capsys):
    setup.say_op_build("cpu_adam")
    out = capsys.readouterr().out
    assert "building DeepSpeed's cpu_adam op (first run on this machine; about 50 s)..." in out
    assert str(fresh_machine) in out


@pytest.mark.parametrize("chosen", [True, False])
def test_the_build_dir_is_where_torch_builds(tmp_path, monkeypatch, chosen: bool):
    """torch's own rule (cpp_extension._get_build_directory): TORCH_EXTENSIONS_DIR/<op> when set (as
    use_install_cache sets it), else the default root's <python>_<device>/<op>."""
    from torch.utils import cpp_extension

    if chosen:
        monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    else:
        monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
        monkeypatch.setattr(cpp_extension, "get_default_build_root", lambda: str(tmp_path))
        monkeypatch.setattr(buildlocks, "extensions_root", lambda: tmp_path)
    assert buildlocks.op_build_dir("cpu_adam") == Path(cpp_extension._get_build_directory("cpu_adam", False))


def cache(op: str, sources: Path) -> Path:
    """A built library in the cache, with the build.ninja naming the sources it was built from."""
    built = buildlocks.op_build_dir(op)
    built.mkdir(parents=True)
    (built / f"{op}.so").write_bytes(b"")
    (built / "build.ninja").write_text(f"build {op}.o: compile {sources}/cpu/adam/{op}.cpp\n")
    return built


def ours() -> Path:
    import deepspeed

    return Path(deepspeed.__file__).resolve().parent / "ops" / "csrc"


def test_a_cache_built_by_another_install_is_announced_as_a_rebuild(fresh_machine, capsys):
    cache("cpu_adam", Path("/elsewhere/venv/site-packages/deepspeed/ops/csrc"))
    setup.say_op_build("cpu_adam")
    assert "building DeepSpeed's cpu_adam op (its cache was built by another DeepSpeed install" in (
        capsys.readouterr().out
    )


def test_a_cached_or_prebuilt_op_is_not_announced(fresh_machine, capsys, monkeypatch):
    cache("cpu_adam", ours())
    setup.say_op_build("cpu_adam")
    monkeypatch.setattr("deepspeed.git_version_info.installed_ops", {"fused_adam": True})
    setup.say_op_build("fused_adam")
    setup.say_op_build(None)  # torch's optimizer: no op
    assert capsys.readouterr().out == ""


def test_which_op_the_optimizer_loads():
    adamw = {"type": "AdamW", "params": {"lr": 1e-3}}
    offload = {"optimizer": adamw, "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    plain = {"optimizer": adamw, "zero_optimization": {"stage": 2}}
    assert engine.optimizer_op(offload, engine.DEEPSPEED) == "cpu_adam"
    assert engine.optimizer_op(plain, engine.DEEPSPEED) == "fused_adam"
    assert engine.optimizer_op(plain, engine.TORCH) is None
