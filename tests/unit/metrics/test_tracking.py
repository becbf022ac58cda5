"""The MLflow sink against MLflow itself, with a local `file:` tracking store (skipped with the reason when
mlflow is not installed), and the preflight error when it is configured but missing."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from dstrain.config.run import MlflowConfig, load_config
from dstrain.errors import ConfigError
from dstrain.training.prepare import preflight
from tests.helpers import make_small_data, write_config

needs_mlflow = pytest.mark.skipif(
    importlib.util.find_spec("mlflow") is None,
    reason="mlflow is not installed (`pip install mlflow-skinny`, in the test extra)",
)
ROWS = [
    {"step": 1, "loss": 2.5, "lr": 1e-4, "tokens": 100, "mfu": None, "note": "text"},
    {"step": 2, "eval_loss": 2.25, "eval_loss/my set": 2.0},
]


@pytest.fixture
def store(tmp_path: Path, monkeypatch) -> MlflowConfig:
    # MLflow 3 keeps the file store for those who ask: a local store needs no server in a test
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    return MlflowConfig(tracking_uri=f"file:{tmp_path / 'mlruns'}", experiment="rag-ft")


def history(settings: MlflowConfig, run_id: str, key: str) -> list[tuple[int, float]]:
    from mlflow import MlflowClient

    return [(m.step, m.value) for m in MlflowClient(settings.tracking_uri).get_metric_history(run_id, key)]


@needs_mlflow
def test_params_metrics_artifact_and_one_run_per_run_dir(tmp_path: Path, store: MlflowConfig):
    from mlflow import MlflowClient

    from dstrain.metrics.tracking import MLFLOW_RUN_FILE, MlflowSink

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    sink = MlflowSink(run_dir, store, {"lora": {"r": 16}, "train": {"max_steps": 2}}, resumed=False)
    for row in ROWS:
        sink.log(row)
    plot = run_dir / "loss.png"
    plot.write_bytes(b"png")
    sink.attach(plot)
    sink.close()
    client = MlflowClient(store.tracking_uri)
    run = client.get_run(sink.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert client.get_experiment(run.info.experiment_id).name == "rag-ft"
    assert run.data.params == {"lora.r": "16", "train.max_steps": "2"}
    assert history(store, sink.run_id, "loss") == [(1, 2.5)]
    assert history(store, sink.run_id, "eval_loss.my set") == [(2, 2.0)]  # "/" is a directory there
    assert "mfu" not in run.data.metrics and "note" not in run.data.metrics  # None and text are left out
    assert [a.path for a in client.list_artifacts(sink.run_id)] == ["loss.png"]
    assert json.loads((run_dir / MLFLOW_RUN_FILE).read_text())["run_id"] == sink.run_id

    resumed = MlflowSink(run_dir, store, {"lora": {"r": 16}, "train": {"max_steps": 4}}, resumed=True)
    assert resumed.run_id == sink.run_id
    assert client.get_run(sink.run_id).info.status == "RUNNING"
    resumed.log({"step": 3, "loss": 2.0})
    resumed.close()  # closed before its end (no plot attached): the run ended on an error
    run = client.get_run(sink.run_id)
    assert run.info.status == "FAILED"
    assert run.data.params["train.max_steps"] == "2"  # MLflow never changes a param...
    assert run.data.tags["resume.train.max_steps"] == "4"  # ...the new value is a tag
    assert history(store, sink.run_id, "loss") == [(1, 2.5), (3, 2.0)]

    fresh = MlflowSink(run_dir, store, {}, resumed=False)  # `dstrain train` again into the same dir
    assert fresh.run_id != sink.run_id
    fresh.close()


@needs_mlflow
def test_a_tracking_store_that_fails_mid_run_is_one_warning(tmp_path: Path, store: MlflowConfig, capsys):
    from dstrain.metrics.tracking import MlflowSink

    sink = MlflowSink(tmp_path, store, {}, resumed=False)
    sink.run_id = "no-such-run"  # the server lost it: every call fails from here
    sink.log({"step": 1, "loss": 1.0})
    sink.log({"step": 2, "loss": 1.0})
    sink.close()
    err = capsys.readouterr().err
    assert err.count("warning: MLflow logging failed at step 1") == 1 and "MLflow is off" in err


@needs_mlflow
def test_a_store_mlflow_refuses_is_one_config_error(tmp_path: Path):
    from dstrain.metrics.tracking import MlflowSink

    with pytest.raises(ConfigError, match=r"train.mlflow: cannot log to MLflow at nosuch://x"):
        MlflowSink(tmp_path, MlflowConfig(tracking_uri="nosuch://x"), {}, resumed=False)


def test_configured_but_not_installed_is_a_preflight_error(tmp_path: Path, monkeypatch):
    files = make_small_data(tmp_path)
    cfg = load_config(write_config(tmp_path, files, train={"mlflow": {"experiment": "x"}}))
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a)
    )
    with pytest.raises(ConfigError, match=r"train.mlflow is set but mlflow is not installed: `pip install"):
        preflight(cfg, world=1)
