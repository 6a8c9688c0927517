"""Metrics through one small protocol; only rank 0 builds the MLflow one.

An MLflow run as its UI expects it: the experiment marked a model-training one
(`mlflow.experimentKind`), the run's source (entry point, git commit), the data it read as
MLflow datasets (`log_dataset`, see `pretrain.tracking.datasets`), system metrics (CPU, GPU, memory,
disk, network) from the first rank of every node as `system/<host>/...`, the export registered
as a model version (`register_model`), and a finished transfer or few-shot run's numbers on the
version it evaluated (`pretrain.tracking.model_registry.attach_results`).
"""
from __future__ import annotations

import logging
import os
import socket
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

import numpy as np

log = logging.getLogger(__name__)
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}  # MLflow 3: "Machine learning", not GenAI
# MLflow's default is 10 s (MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides both); the last
# window is flushed at close, so a run shorter than one interval still records a sample.
SYSTEM_METRICS_INTERVAL_S = 10.0


class Tracker(Protocol):
    run_id: str | None

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def log_dataset(self, dataset: Any, context: str) -> None: ...
    def register_model(self, name: str, *, model: str, step: int) -> None: ...
    def close(self, status: str = "FINISHED") -> None: ...


class NullTracker:
    run_id = None

    def log_params(self, params): pass
    def log_metrics(self, metrics, step=None): pass
    def log_artifact(self, path, artifact_path=None): pass
    def set_tags(self, tags): pass
    def log_dataset(self, dataset, context): pass
    def register_model(self, name, *, model, step): pass
    def close(self, status="FINISHED"): pass


class SystemMetrics:
    """MLflow's system-metrics sampler on `run_id`, named after this host; `stop` keeps the last window.

    MLflow's monitor drops the samples taken since its last publish when stopped; `stop` publishes
    them, so every run records at least one sample per node.
    """

    def __init__(self, run_id: str, tracking_uri: str, *, resume: bool):
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # "skip logging GPU metrics" on CPU
        self.monitor = SystemMetricsMonitor(run_id, sampling_interval=SYSTEM_METRICS_INTERVAL_S, resume_logging=resume,
                                            node_id=socket.gethostname(), tracking_uri=tracking_uri)
        self.monitor.start()

    def stop(self) -> None:
        monitor = self.monitor
        monitor.finish()
        if any(getattr(m, "_metrics", None) for m in monitor.monitors):
            try:
                monitor.publish_metrics(monitor.aggregate_metrics())
                monitor.mlflow_logger.flush()
            except Exception as err:  # a tracking server gone at the end costs the last window, not the run
                log.warning("last system-metrics window of run %s not logged: %s", monitor._run_id, err)


class NodeMetrics(NullTracker):
    """The first rank of a node other than rank 0's: logs its node's system metrics into rank 0's run."""

    def __init__(self, run_id: str, tracking_uri: str, *, resume: bool):
        self.system = SystemMetrics(run_id, tracking_uri, resume=resume)

    def close(self, status="FINISHED"):
        self.system.stop()


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


def ui_url(tracking_uri: str, page: str) -> str | None:
    """A page of the MLflow UI serving `tracking_uri` (None for a local store), in its model-training view:
    MLflow 3.17's UI picks GenAI or model training by its own switch (default GenAI), not by the
    experiment's kind, so links carry `workflowType=machine_learning`."""
    if not tracking_uri.startswith(("http://", "https://")):
        return None
    return f"{tracking_uri.rstrip('/')}/#/{page}?workflowType=machine_learning"


def experiment_id(client, name: str, tracking_uri: str) -> str:
    """The experiment `name`, created (or marked) as a model-training one."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        return client.create_experiment(name, artifact_location=default_artifact_location(tracking_uri), tags=EXPERIMENT_KIND)
    if "mlflow.experimentKind" not in exp.tags:
        client.set_experiment_tag(exp.experiment_id, *next(iter(EXPERIMENT_KIND.items())))
    return exp.experiment_id


def source_tags() -> dict[str, str]:
    """The run's source as MLflow's UI shows it: the command and this package's git commit."""
    from mlflow.utils.git_utils import get_git_branch, get_git_commit, get_git_repo_url

    main = Path(sys.argv[0])
    command = f"python -m {main.parent.name} {' '.join(sys.argv[1:2])}".strip() if main.name == "__main__.py" else main.name
    tags = {"mlflow.source.name": command, "mlflow.source.type": "LOCAL"}
    package = str(Path(__file__).resolve().parent)
    git = {"mlflow.source.git.commit": get_git_commit(package), "mlflow.source.git.branch": get_git_branch(package),
           "mlflow.source.git.repoURL": get_git_repo_url(package)}
    return tags | {k: v for k, v in git.items() if v}


class MLflowTracker:
    """One MLflow run; nested under `parent_run_id` when given (the demo's parent run)."""

    def __init__(self, *, tracking_uri: str, experiment: str, run_name: str | None = None,
                 parent_run_id: str | None = None, tags: dict[str, str] | None = None,
                 run_id: str | None = None, system_metrics: bool = True):
        from mlflow.tracking import MlflowClient

        os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        self.tracking_uri = tracking_uri
        self.tags = dict(tags or {})
        if run_id is not None:  # a resumed job continues its run
            self.client.update_run(run_id, status="RUNNING")
            self.run_id = run_id
        else:
            all_tags = source_tags() | self.tags
            if parent_run_id:
                all_tags["mlflow.parentRunId"] = parent_run_id
            exp_id = experiment_id(self.client, experiment, tracking_uri)
            self.run_id = self.client.create_run(exp_id, run_name=run_name, tags=all_tags).info.run_id
        self.system = SystemMetrics(self.run_id, tracking_uri, resume=run_id is not None) if system_metrics else None

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        from pretrain.tracking.redaction import redact

        flat = [Param(k, str(v)[:6000]) for k, v in _flatten(redact(params)).items()]  # no passwords or signed URLs
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

    def log_dataset(self, dataset: Any, context: str) -> None:
        """An `mlflow.data` dataset as this run's input, `context` "train", "val", "test"... (the UI's Dataset column)."""
        from mlflow.entities import DatasetInput, InputTag

        self.client.log_inputs(self.run_id, [DatasetInput(dataset._to_mlflow_entity(), [InputTag("mlflow.data.context", context)])])

    def register_model(self, name: str, *, model: str, step: int) -> None:
        """This run's `model` artifacts as a new version of registered model `name` (a registry fault: a warning,
        the export stays a run artifact)."""
        from mlflow.exceptions import MlflowException

        from pretrain.tracking.model_registry import register_export

        try:
            version = register_export(self.client, name=name, run_id=self.run_id, step=step, model=model)
        except MlflowException as err:
            log.warning("run %s: export not registered as %r: %s", self.run_id, name, err.message)
            return
        self.set_tags({"registered_model": f"models:/{version.name}/{version.version}"})
        print(f"registered models:/{version.name}/{version.version}")

    def close(self, status: str = "FINISHED") -> None:
        if self.system is not None:
            self.system.stop()
        self.client.set_terminated(self.run_id, status)
        if status == "FINISHED" and self.tags.get("stage") in ("transfer", "fewshot"):
            self._attach_results()

    def _attach_results(self) -> None:
        """The numbers onto the registered version this run evaluated; a registry fault costs only a warning."""
        from mlflow.exceptions import MlflowException

        from pretrain.tracking.model_registry import attach_results
        from pretrain.tasks.report import run_results

        try:
            run = self.client.get_run(self.run_id)
            attach_results(self.client, run, run_results(run), self.tracking_uri)
        except (MlflowException, LookupError) as err:
            log.warning("run %s: results not attached to a registered model version: %s", self.run_id, err)


def _node_leader(run_id: str | None) -> tuple[str | None, bool]:
    """Rank 0's run id on every rank, and whether this rank is the lowest on its host (collective)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return run_id, False
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (socket.gethostname(), run_id))
    host, rank = socket.gethostname(), dist.get_rank()
    return gathered[0][1], rank == min(i for i, (h, _) in enumerate(gathered) if h == host)


def build_tracker(*, is_main: bool, tracking_uri: str, experiment: str, run_name: str | None = None,
                  parent_run_id: str | None = None, tags: dict[str, str] | None = None,
                  run_id: str | None = None) -> Tracker:
    """Rank 0's MLflow run; the first rank of each other node samples its system metrics into it.

    Collective under torch.distributed: every rank calls it."""
    tracker, error = NullTracker(), None
    if is_main:
        try:
            from pretrain.tracking.guard import SurvivingTracker, check_reachable

            check_reachable(tracking_uri)  # a clear error now, not a stall in MLflow's retries
            tracker = SurvivingTracker(MLflowTracker(tracking_uri=tracking_uri, experiment=experiment, run_name=run_name,
                                                     parent_run_id=parent_run_id, tags=tags, run_id=run_id))
        except Exception as err:  # the other ranks still leave the gather below
            error = err
    shared_run, leader = _node_leader(tracker.run_id)
    if error is not None:
        raise error
    if not is_main and leader and shared_run is not None:
        return NodeMetrics(shared_run, tracking_uri, resume=run_id is not None)
    return tracker
