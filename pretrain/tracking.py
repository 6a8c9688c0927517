"""Metrics through one small protocol; only rank 0 builds the MLflow one."""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

import numpy as np


class Tracker(Protocol):
    run_id: str | None

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def close(self, status: str = "FINISHED") -> None: ...


class NullTracker:
    run_id = None

    def log_params(self, params): pass
    def log_metrics(self, metrics, step=None): pass
    def log_artifact(self, path, artifact_path=None): pass
    def set_tags(self, tags): pass
    def close(self, status="FINISHED"): pass


def seed_stats(key: str, values: Sequence[float]) -> dict[str, float]:
    """`<key>/seed<i>` per seed, `<key>` their mean and `<key>/std` their population std."""
    out = {f"{key}/seed{i}": v for i, v in enumerate(values)}
    out[key], out[f"{key}/std"] = float(np.mean(values)), float(np.std(values))
    return out


@contextmanager
def failing_closes(tracker: Tracker) -> Iterator[Tracker]:
    """Closes `tracker` as FAILED if the block raises (anything, KeyboardInterrupt too), then re-raises."""
    try:
        yield tracker
    except BaseException:
        tracker.close("FAILED")
        raise


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def default_artifact_location(tracking_uri: str) -> str | None:
    """Artifacts of a local sqlite store go to `mlartifacts/` beside the database."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri.removeprefix("sqlite:///")).resolve()
        return (db.parent / "mlartifacts").as_uri()
    return None


class MLflowTracker:
    """One MLflow run; nested under `parent_run_id` when given (the demo's parent run)."""

    def __init__(self, *, tracking_uri: str, experiment: str, run_name: str | None = None,
                 parent_run_id: str | None = None, tags: dict[str, str] | None = None,
                 run_id: str | None = None):
        import mlflow
        from mlflow.tracking import MlflowClient

        os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.tracking_uri = tracking_uri
        self._mlflow = mlflow
        if run_id is not None:  # a resumed job continues its run
            self.client.update_run(run_id, status="RUNNING")
            self.run_id = run_id
            return
        exp = self.client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(
            experiment, artifact_location=default_artifact_location(tracking_uri))
        all_tags = dict(tags or {})
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = self.client.create_run(exp_id, run_name=run_name, tags=all_tags)
        self.run_id = run.info.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        flat = [Param(k, str(v)[:6000]) for k, v in _flatten(params).items()]
        for i in range(0, len(flat), 100):
            self.client.log_batch(self.run_id, params=flat[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, v)

    def close(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)


def build_tracker(*, is_main: bool, tracking_uri: str, experiment: str, run_name: str | None = None,
                  parent_run_id: str | None = None, tags: dict[str, str] | None = None,
                  run_id: str | None = None) -> Tracker:
    if not is_main:
        return NullTracker()
    return MLflowTracker(tracking_uri=tracking_uri, experiment=experiment, run_name=run_name,
                         parent_run_id=parent_run_id, tags=tags, run_id=run_id)
