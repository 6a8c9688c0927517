"""Exported models fetched from S3 (a real S3 server on 127.0.0.1) and from MLflow runs."""
from __future__ import annotations

import functools
import http.server
import threading

import pytest
import torch

from pretrain.checkpoint.export import load_exported
from pretrain.tracking.model_registry import resolve_version
from pretrain.checkpoint.model_source import local_exported
from pretrain.tracking.tracker import MLflowTracker


def same_model(a, b) -> bool:
    x = torch.randn(2, 3, 28, 28)
    return torch.equal(a(x), b(x))


def test_s3_export_with_its_sidecar(s3_server, tiny_export, monkeypatch):
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    bucket = s3_server.create_bucket("models")
    client = s3_server.client()
    client.upload_file(str(tiny_export), bucket, "runs/a/model.safetensors")
    client.upload_file(str(tiny_export.with_suffix(".json")), bucket, "runs/a/model.json")
    with local_exported(f"s3://{bucket}/runs/a/model.safetensors") as path:
        fetched, meta = load_exported(path)
        folder = path.parent
    assert not folder.exists()  # the download is removed after use
    assert same_model(fetched, load_exported(tiny_export)[0]) and meta["run_id"] == "pretrain-run"

    client.upload_file(str(tiny_export), bucket, "lonely/model.safetensors")
    with pytest.raises(FileNotFoundError, match=r"s3://.*/lonely/model.json does not exist.*the .safetensors and its .json sidecar side by side"):
        with local_exported(f"s3://{bucket}/lonely/model.safetensors"):
            pass
    with pytest.raises(ValueError, match="expected s3://bucket/path/model.safetensors"):
        with local_exported(f"s3://{bucket}/runs/a/"):
            pass


def test_mlflow_run_model_artifacts(tiny_export, tracking_uri):
    run = MLflowTracker(tracking_uri=tracking_uri, experiment="pre", run_name="pretrain")
    run.log_artifact(tiny_export, "model")
    run.log_artifact(tiny_export.with_suffix(".json"), "model")
    run.close()
    reference = load_exported(tiny_export)[0]
    for source in (f"runs:/{run.run_id}", f"runs:/{run.run_id}/model", f"mlflow:{run.run_id}"):
        with local_exported(source, tracking_uri=tracking_uri) as path:
            assert same_model(load_exported(path)[0], reference), source
    empty = MLflowTracker(tracking_uri=tracking_uri, experiment="pre", run_name="no-export")
    with pytest.raises(FileNotFoundError, match=f"MLflow run {empty.run_id} .*a `python -m pretrain train` run logs its export there"):
        with local_exported(f"runs:/{empty.run_id}", tracking_uri=tracking_uri):
            pass


def test_http_export(tiny_export):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tiny_export.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with local_exported(f"http://127.0.0.1:{server.server_port}/model.safetensors") as path:
            assert same_model(load_exported(path)[0], load_exported(tiny_export)[0])
    finally:
        server.shutdown()
        server.server_close()


def test_registered_versions_by_alias_number_and_latest(tiny_export, tracking_uri):
    run = MLflowTracker(tracking_uri=tracking_uri, experiment="pre", run_name="pretrain", system_metrics=False)
    run.log_artifact(tiny_export, "model")
    run.log_artifact(tiny_export.with_suffix(".json"), "model")
    run.register_model("vitscale-vit_demo", model="vit_demo", step=7)
    run.register_model("vitscale-vit_demo", model="vit_demo", step=7)  # a second export of the same run: version 2
    run.close()
    run.client.set_registered_model_alias("vitscale-vit_demo", "best-digits", "1")
    reference = load_exported(tiny_export)[0]
    for source, version in (("models:/vitscale-vit_demo/1", "1"), ("models:/vitscale-vit_demo@best-digits", "1"),
                            ("models:/vitscale-vit_demo@latest", "2"), ("models:/vitscale-vit_demo/latest", "2")):
        assert str(resolve_version(source, tracking_uri=tracking_uri).version) == version, source
        with local_exported(source, tracking_uri=tracking_uri) as path:
            assert same_model(load_exported(path)[0], reference), source
    assert run.client.get_run(run.run_id).data.tags["registered_model"] == "models:/vitscale-vit_demo/2"
    with pytest.raises(LookupError, match=r"models:/vitscale-vit_b16@latest.* \(registered models there: vitscale-vit_demo\)"):
        with local_exported("models:/vitscale-vit_b16@latest", tracking_uri=tracking_uri):
            pass
    with pytest.raises(LookupError, match=r"models:/vitscale-vit_demo@best-cifar10' at .*alias best-cifar10 not found"):
        resolve_version("models:/vitscale-vit_demo@best-cifar10", tracking_uri=tracking_uri)
    with pytest.raises(ValueError, match="expected models:/<name>@<alias> or models:/<name>/<version>"):
        resolve_version("models:/vitscale-vit_demo/one", tracking_uri=tracking_uri)
