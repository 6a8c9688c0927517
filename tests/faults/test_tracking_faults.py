"""The MLflow tracking server unreachable at start, and going away mid-run."""
from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
import urllib.request

import pytest

from pretrain.tracking.tracker import build_tracker


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def killable_mlflow_server(_mlflow_template, tmp_path):
    """A real `mlflow server` on 127.0.0.1 of this test alone (the session's shared one must not
    be killed), over a copy of the session's empty store; yields (uri, process)."""
    shutil.copy(_mlflow_template, tmp_path / "server.db")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--workers", "1",
                             "--default-artifact-root", str(tmp_path / "artifacts")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                pytest.fail("mlflow server did not start")
            time.sleep(0.2)
    yield uri, proc
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_an_unreachable_tracking_server_is_a_clear_error_at_start():
    """tracking.tracking_uri names a server that is not running | nothing (no step ran) | a one-line ConnectionError naming the server and what to do, within seconds"""
    start = time.monotonic()
    with pytest.raises(ConnectionError, match=r"cannot reach the MLflow tracking server at http://u:\*\*\*@127.0.0.1:9 .*tracking.tracking_uri"):
        build_tracker(is_main=True, tracking_uri="http://u:secret@127.0.0.1:9", experiment="x")
    assert time.monotonic() - start < 10


@pytest.mark.parametrize("task", ["pretrain", "detect"])
def test_an_unreachable_tracking_server_stops_a_run_before_any_work(task, tmp_path):
    """a recipe whose tracking server is not running (and whose data does not exist) | nothing (no data, model or engine touched) | the tracking error comes first, on every rank, before the data is opened"""
    from pretrain.config import PretrainConfig, load_config
    from pretrain.tasks.detection.config import DetectConfig
    from pretrain.tasks.detection.run import run as run_detection
    from pretrain.tasks.pretrain import run as run_pretraining

    repo = Path(__file__).resolve().parents[2]
    recipe, config_type, run, data = {
        "pretrain": ("configs/pretrain/demo_fmnist.yaml", PretrainConfig, run_pretraining, "data.train_urls"),
        "detect": ("configs/detect/shapes_tiny.yaml", DetectConfig, run_detection, "data.train.dir"),
    }[task]
    cfg = load_config(config_type, repo / recipe, [f"{data}={tmp_path}/missing", "tracking.tracking_uri=http://127.0.0.1:9"])
    with pytest.raises(ConnectionError, match="cannot reach the MLflow tracking server at http://127.0.0.1:9"):
        run(cfg, None)  # no process group either: nothing before the check may need one


def test_a_tracking_server_going_away_mid_run_costs_only_its_metrics(killable_mlflow_server, caplog):
    """the MLflow server killed mid-run | the metrics logged while it is away (dropped, not buffered) | one warning saying so; logging goes on without stalling the steps"""
    from mlflow.tracking import MlflowClient

    uri, proc = killable_mlflow_server
    tracker = build_tracker(is_main=True, tracking_uri=uri, experiment="away")
    for step in range(1, 4):
        tracker.log_metrics({"loss": 1.0 / step}, step=step)
    assert [m.step for m in MlflowClient(uri).get_metric_history(tracker.run_id, "loss")] == [1, 2, 3]
    os.killpg(proc.pid, signal.SIGKILL)  # the server and its workers
    proc.wait()
    start = time.monotonic()
    with caplog.at_level(logging.WARNING):
        for step in range(4, 40):  # the training loop's calls, one per step
            tracker.log_metrics({"loss": 1.0 / step}, step=step)
    assert time.monotonic() - start < 30  # one failed call's retries, then skipped: steps do not wait on it
    assert caplog.text.count("tracking server unreachable") == 1 and "DROPPED (not buffered)" in caplog.text
    assert tracker.dropped == 36
