"""The S3 store failing under the trainer: killed mid-upload, a wrong bucket at start."""
from __future__ import annotations

import os
import threading

import pytest

from data_pipeline import storage
from pretrain.checkpoint.checkpointer import Checkpointer, upload_checkpoint

PART = 5 << 20  # S3's smallest part


def test_s3_killed_and_restarted_during_a_checkpoint_upload(killable_s3, s3_server, tmp_path, monkeypatch, caplog):
    """the S3 server killed after the first part of a checkpoint upload, back 3 s later | nothing | the upload is tried again and continues the multipart upload: parts already stored are not sent again"""
    monkeypatch.setattr(storage, "MULTIPART_BYTES", PART)
    monkeypatch.setattr(storage, "UPLOAD_WORKERS", 2)
    bucket = s3_server.create_bucket("killed")
    folder = tmp_path / "checkpoints" / "step00000004"
    folder.mkdir(parents=True)
    (folder / "mp_rank_00_model_states.pt").write_bytes(os.urandom(6 * PART))  # 6 parts
    (folder / "meta.json").write_text("{}")
    sends, stored = [], []  # part numbers as sent, and as stored (200 OK)

    def sent(params, context, **kwargs):
        context["part"] = params["PartNumber"]
        sends.append(params["PartNumber"])

    def answered(http_response, context, **kwargs):
        if http_response.status_code == 200:
            stored.append(context["part"])
            if len(stored) == 1:  # the server dies as the first part is stored
                killable_s3.kill()
                threading.Timer(3.0, killable_s3.restart).start()

    events = storage.s3_client().meta.events
    events.register("before-parameter-build.s3.UploadPart", sent)
    events.register("after-call.s3.UploadPart", answered)

    uri = f"s3://{bucket}/run/checkpoints"
    upload_checkpoint(folder, uri, keep_last=2)

    assert storage.read_text(f"{uri}/latest") == "step00000004"
    back = storage.download_file(f"{uri}/step00000004/mp_rank_00_model_states.pt", tmp_path / "back.pt")
    assert back.read_bytes() == (folder / "mp_rank_00_model_states.pt").read_bytes()
    first = stored[0]
    assert len(stored) == len(set(stored))  # no part stored twice (one cut after the server stored it is not resent either)
    assert sends.count(first) == 1  # the part stored before the kill was not sent again
    assert "trying again" in caplog.text
    assert s3_server.client().list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_an_unwritable_remote_uri_fails_at_start(s3_server, tmp_path, monkeypatch):
    """train.remote_uri names a bucket that does not exist | nothing (no step ran) | a one-line error naming the URI when the checkpointer is made, before any work"""
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    storage.reset_s3_clients()
    with pytest.raises(FileNotFoundError, match="cannot write to s3://no-such-bucket-here/run/checkpoints.*check the bucket"):
        Checkpointer(tmp_path, keep_last=1, rank=0, world_size=1, remote_uri="s3://no-such-bucket-here/run/checkpoints")
    bucket = s3_server.create_bucket("ok")
    Checkpointer(tmp_path, keep_last=1, rank=0, world_size=1, remote_uri=f"s3://{bucket}/run/checkpoints")
    assert storage.list_keys(f"s3://{bucket}/run") == {}  # the probe object is gone
