"""MLflow tracking for a run (`train.mlflow: {tracking_uri, experiment, run_name}`): one more metrics sink
(`dstrain.metrics.sinks`), on rank 0 only, with mlflow imported here only, so runs without it never load it.

- params: the resolved run config, flattened (`lora.r`, `data.max_seq_len`, ...);
- metrics: every numeric value of every logged row, at the row's step (train and eval rows alike);
- artifact: the run dir's loss plot, at the end;
- one MLflow run per run dir: its id is kept in RUN_DIR/mlflow_run.json, and a resumed run continues it.

The client logs synchronously unless MLFLOW_ENABLE_ASYNC_LOGGING=true (MLflow's own switch). A tracking
server that fails mid-run is one warning and MLflow goes quiet: training goes on, and the run dir has every
row. A failure to start (a wrong URI, a server that does not answer) is one config error before step 1.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dstrain import storage
from dstrain.checkpoint.atomic import write_text_atomic
from dstrain.errors import ConfigError

if TYPE_CHECKING:
    from dstrain.config.run import MlflowConfig

MLFLOW_RUN_FILE = "mlflow_run.json"
MLFLOW_KEY = re.compile(r"[^\w\-. ]")  # what MLflow allows in a name, less "/"


def mlflow_key(key: str) -> str:
    """`eval_loss/<name>` -> `eval_loss.<name>`: MLflow's file store makes a "/" a directory, which clashes
    with the plain `eval_loss` beside it; other characters MLflow refuses become "_"."""
    return MLFLOW_KEY.sub("_", key.replace("/", "."))


def flat_params(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """{"lora.r": "16", ...}: the resolved config as MLflow params (strings, cut to MLflow's 6,000 chars)."""
    out: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out |= flat_params(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = str(value)[:6000]
    return out


class MlflowSink:
    """An MLflow run (mlflow imported here only): the resolved config as params, each row's numbers as
    metrics at its step, the loss plot as an artifact at the end. Its id is kept in RUN_DIR/mlflow_run.json,
    so a resumed run continues the same MLflow run (params it already has keep their first value: MLflow
    never changes one; a value changed on resume is added as tag `resume.<key>`)."""

    def __init__(
        self, run_dir: Path, settings: MlflowConfig, run_config: dict[str, Any] | None, resumed: bool
    ) -> None:
        from mlflow import MlflowClient  # checked installed in preflight

        self.attached, self.failed, self.uri = False, False, settings.tracking_uri or "MLflow's default"
        try:
            self.client = MlflowClient(settings.tracking_uri or None)
            self.uri = str(self.client.tracking_uri)
            self.run_id = (resumed and self.continued(run_dir)) or self.start(run_dir, settings)
            self.log_params(flat_params(run_config or {}))
        except Exception as exc:  # a wrong URI, a server that does not answer, a store MLflow refuses
            raise ConfigError([f"train.mlflow: cannot log to MLflow at {self.uri}: {exc}"]) from exc
        record = json.dumps({"tracking_uri": self.uri, "run_id": self.run_id}) + "\n"
        with storage.guard(storage.run_place(run_dir), "the MLflow run id", run_dir / MLFLOW_RUN_FILE):
            write_text_atomic(run_dir / MLFLOW_RUN_FILE, record)

    def continued(self, run_dir: Path) -> str | None:
        """The run dir's MLflow run, when it is in this tracking store (marked running again)."""
        try:
            saved = json.loads((run_dir / MLFLOW_RUN_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if saved.get("tracking_uri") != self.uri:
            return None
        try:
            self.client.get_run(saved["run_id"])
        except Exception:  # deleted from the store since: a new run
            return None
        self.client.update_run(saved["run_id"], status="RUNNING")
        return str(saved["run_id"])

    def start(self, run_dir: Path, settings: MlflowConfig) -> str:
        name = settings.experiment or "Default"
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        run = self.client.create_run(experiment_id, run_name=settings.run_name or run_dir.name)
        return str(run.info.run_id)

    def log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param, RunTag

        have = self.client.get_run(self.run_id).data.params
        new = [Param(mlflow_key(k), v) for k, v in params.items() if mlflow_key(k) not in have]
        changed = [RunTag(f"resume.{k}", v) for k, v in params.items() if have.get(mlflow_key(k), v) != v]
        for start in range(0, len(new), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=new[start : start + 100])
        if changed:
            self.client.log_batch(self.run_id, tags=changed)

    def log(self, row: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        if self.failed:
            return
        stamp, step = int(time.time() * 1000), int(row["step"])
        metrics = [
            Metric(mlflow_key(k), float(v), stamp, step)
            for k, v in row.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
        ]
        self.guarded(f"at step {step}", lambda: self.client.log_batch(self.run_id, metrics=metrics))

    def attach(self, path: Path) -> None:
        self.attached = True
        self.guarded(f"storing {path.name}", lambda: self.client.log_artifact(self.run_id, str(path)))

    def guarded(self, what: str, call: Callable[[], object]) -> None:
        """A tracking server that fails mid-run does not stop training: one warning, then MLflow is off."""
        try:
            call()
        except Exception as exc:
            self.failed = True
            print(
                f"warning: MLflow logging failed {what} ({type(exc).__name__}: {exc}); MLflow is off for the "
                "rest of this run (metrics.jsonl and TensorBoard have every row)",
                file=sys.stderr,
            )

    def close(self) -> None:
        if not self.failed:  # FAILED: the run ended on an error before its end (a resume sets RUNNING again)
            status = "FINISHED" if self.attached else "FAILED"
            self.guarded("at the end", lambda: self.client.set_terminated(self.run_id, status))
