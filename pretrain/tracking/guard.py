"""The tracking server as a dependency that can fail: checked at start, survived mid-run.

At start an `http(s)://` tracking URI must answer MLflow's `/health` within a few seconds,
or the run stops with one line saying what to do: before any step, not after hours of
training with nothing recorded. Mid-run, a server that goes away must not stop training:
`SurvivingTracker` turns a failed `log_metrics` / `log_artifact` / `set_tags` into one
warning, and the values of the calls that fail (and of all calls in the next `RETRY_S`
seconds, so a dead server costs one timeout a minute, not one per step) are DROPPED, not
buffered: the checkpoint, not MLflow, is what a resume needs, and a buffer would grow
without bound while a server stays down. When the server answers again it says how many
calls were dropped. MLflow's own retries are lowered to `MLFLOW_RETRIES` (its default backs
off for minutes per call, which would stall every step).
"""
from __future__ import annotations

import logging
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from pretrain.tracking.redaction import redact_url

log = logging.getLogger(__name__)

RETRY_S = 60.0
MLFLOW_RETRIES = "2"
CHECK_TIMEOUT_S = 5.0


def check_reachable(tracking_uri: str) -> None:
    """Raise ConnectionError, naming the server and what to do, when an http(s) tracking URI does not answer."""
    if not tracking_uri.startswith(("http://", "https://")):
        return  # a file or sqlite store: MLflow creates it
    try:
        urllib.request.urlopen(tracking_uri.rstrip("/") + "/health", timeout=CHECK_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return  # it answers (a proxy wanting credentials, a server without /health): MLflow takes it from here
    except OSError as err:
        reason = getattr(err, "reason", err)
        raise ConnectionError(f"cannot reach the MLflow tracking server at {redact_url(tracking_uri)} ({reason}); "
                              "start it (`mlflow server ...`) or set tracking.tracking_uri (sqlite:///mlflow.db needs no server)") from None


class SurvivingTracker:
    """`tracker` whose per-step logging outlives its server (see the module docstring)."""

    def __init__(self, tracker: Any, *, retry_s: float = RETRY_S):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", MLFLOW_RETRIES)
        self._tracker, self._retry_s = tracker, retry_s
        self._paused_until = 0.0
        self.dropped = 0

    def __getattr__(self, name: str) -> Any:  # run_id, log_params, close, ...: as the wrapped tracker
        return getattr(self._tracker, name)

    def _guarded(self, what: str, call, *args) -> None:
        if time.monotonic() < self._paused_until:
            self.dropped += 1
            return
        try:
            call(*args)
        except Exception as err:  # MlflowException, requests' connection errors, ...
            if not self.dropped:
                log.warning("tracking server unreachable (%s: %s); training goes on, %s and further values are DROPPED "
                            "(not buffered) until it answers again, tried every %.0f s", type(err).__name__, err, what, self._retry_s)
            self.dropped += 1
            self._paused_until = time.monotonic() + self._retry_s
            return
        if self.dropped:
            log.warning("tracking server answers again; %d logging calls were dropped while it was away", self.dropped)
            self.dropped = 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self._guarded(f"metrics of step {step}", self._tracker.log_metrics, metrics, step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._guarded(f"artifact {path}", self._tracker.log_artifact, path, artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        self._guarded("tags", self._tracker.set_tags, tags)
