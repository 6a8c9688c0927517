"""No passwords or signed URLs in what is logged: MLflow params and checkpoint meta."""
from __future__ import annotations

from mlflow.tracking import MlflowClient

from pretrain.tracking.redaction import redact, redact_url
from pretrain.tracking.tracker import build_tracker

SIGNED = "https://bucket.s3.amazonaws.com/train-000000.tar?X-Amz-Credential=AKIA%2F1&X-Amz-Signature=deadbeef"


def test_urls_lose_their_passwords_and_signatures_and_keep_the_rest():
    assert redact_url("http://alice:hunter2@mlflow.example:5000/x") == "http://alice:***@mlflow.example:5000/x"
    assert redact_url(SIGNED) == "https://bucket.s3.amazonaws.com/train-000000.tar?***"
    assert redact_url("https://host/shard.tar?version=3") == "https://host/shard.tar?version=3"  # nothing secret
    config = {"data": {"train_urls": f"{SIGNED}::/local/b.tar"}, "tracking": {"password": "pw", "experiment": "e"},
              "train": {"steps": 10, "remote_uri": "s3://bucket/run"}}
    assert redact(config) == {"data": {"train_urls": "https://bucket.s3.amazonaws.com/train-000000.tar?***::/local/b.tar"},
                              "tracking": {"password": "***", "experiment": "e"}, "train": {"steps": 10, "remote_uri": "s3://bucket/run"}}


def test_mlflow_params_hold_no_secret(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = build_tracker(is_main=True, tracking_uri=uri, experiment="secrets")
    tracker.log_params({"tracking": {"tracking_uri": "http://alice:hunter2@mlflow.example:5000"}, "data": {"train_urls": SIGNED}})
    params = MlflowClient(uri).get_run(tracker.run_id).data.params
    tracker.close()
    assert params["tracking.tracking_uri"] == "http://alice:***@mlflow.example:5000"
    assert "deadbeef" not in params["data.train_urls"] and "AKIA" not in params["data.train_urls"]
