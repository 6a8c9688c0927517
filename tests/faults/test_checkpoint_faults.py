"""Checkpoints under faults: a full disk, a flipped bit, a hostile `latest`, a wrong bucket."""
from __future__ import annotations

import json
import resource
import signal

import pytest
import torch

from pretrain.checkpoint.checkpointer import Checkpointer

META = {"config": {"tracking": {"tracking_uri": "http://alice:hunter2@mlflow.example:5000"}}, "data": {}}


def checkpointer(root, **kwargs) -> Checkpointer:
    return Checkpointer(root, keep_last=3, rank=0, world_size=1, **kwargs)


def test_disk_full_during_a_save(tiny_engine, tmp_path):
    """a size-limited disk (RLIMIT_FSIZE) during a checkpoint save | the checkpoint being written | one-line error naming the folder; `latest` still names the previous one, whole; no half-written folder"""
    root = tmp_path / "checkpoints"
    ckpt = checkpointer(root)
    tiny_engine.train_one()
    ckpt.save(tiny_engine, step=1, meta=META)
    tiny_engine.train_one()
    old_limit, old_handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2000, old_limit[1]))  # writes past 2 kB fail with EFBIG
    try:
        with pytest.raises(OSError, match=r"could not write checkpoint step00000002 .*full disk.*`latest` still names step00000001"):
            ckpt.save(tiny_engine, step=2, meta=META)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    assert (root / "latest").read_text() == "step00000001"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["step00000001"]  # no half-written folder
    point = ckpt.prepare_resume()  # the manifest checks the previous checkpoint whole
    assert point.step == 1
    ckpt.load(tiny_engine, point)


def test_a_flipped_bit_is_refused_before_anything_is_unpickled(tiny_engine, tmp_path, monkeypatch):
    """one bit flipped in a checkpoint file | nothing (the file is refused) | the sha256 manifest in meta.json names the file; nothing is unpickled"""
    root = tmp_path / "checkpoints"
    tiny_engine.train_one()
    checkpointer(root).save(tiny_engine, step=1, meta=META)
    meta = json.loads((root / "step00000001" / "meta.json").read_text())
    assert "hunter2" not in json.dumps(meta) and meta["config"]["tracking"]["tracking_uri"] == "http://alice:***@mlflow.example:5000"
    target = root / "step00000001" / "mp_rank_00_model_states.pt"
    assert meta["files"]["mp_rank_00_model_states.pt"]
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x10
    target.write_bytes(data)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load ran on a refused checkpoint"))
    with pytest.raises(ValueError, match="mp_rank_00_model_states.pt does not match its sha256"):
        checkpointer(root).prepare_resume()


@pytest.mark.parametrize("tag", ["../x", "/etc", "step1/../../x"])
def test_a_latest_naming_a_path_outside_the_folder_is_refused(one_process_group, tmp_path, tag):
    """`latest` names ../x | nothing | refused with the file that names it; nothing read or written outside checkpoints/"""
    root = tmp_path / "checkpoints"
    root.mkdir()
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "meta.json").write_text(json.dumps({"step": 1, "world_size": 1}))
    (root / "latest").write_text(tag)
    with pytest.raises(ValueError, match="not a checkpoint folder name"):
        checkpointer(root).prepare_resume()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    from data_pipeline import storage

    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    storage.reset_s3_clients()
    yield s3_server
    storage.reset_s3_clients()


def test_a_bit_flipped_in_a_downloaded_checkpoint_is_refused_before_unpickling(tiny_engine, s3_env, tmp_path, monkeypatch):
    """one bit flipped in a checkpoint object on S3, resumed on a fresh machine | nothing (the download is refused) | the manifest check names the file before anything is unpickled; nothing is put in place locally"""
    bucket = s3_env.create_bucket("flip")
    uri = f"s3://{bucket}/run/checkpoints"
    tiny_engine.train_one()
    saver = checkpointer(tmp_path / "a", remote_uri=uri)
    saver.save(tiny_engine, step=1, meta=META)
    saver.close()  # the upload finished
    client = s3_env.client()
    key = "run/checkpoints/step00000001/mp_rank_00_model_states.pt"
    data = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    data[100] ^= 0x01
    client.put_object(Bucket=bucket, Key=key, Body=bytes(data))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load ran on a refused checkpoint"))
    fresh = checkpointer(tmp_path / "b", remote_uri=uri)
    with pytest.raises(ValueError, match="mp_rank_00_model_states.pt does not match its sha256"):
        fresh.prepare_resume()
    assert not (tmp_path / "b" / "step00000001").exists() and not (tmp_path / "b" / "latest").exists()


@pytest.mark.parametrize("tag", ["../x", "../../etc"])
def test_a_remote_latest_naming_a_path_outside_the_folder_is_refused(s3_env, one_process_group, tmp_path, tag):
    """the `latest` object on S3 names ../x | nothing | refused before any download; nothing written outside checkpoints/"""
    bucket = s3_env.create_bucket("traversal")
    client = s3_env.client()
    client.put_object(Bucket=bucket, Key="run/checkpoints/latest", Body=tag.encode())
    client.put_object(Bucket=bucket, Key="run/x/meta.json", Body=b"{}")
    root = tmp_path / "deep" / "checkpoints"
    with pytest.raises(ValueError, match="not a checkpoint folder name"):
        checkpointer(root, remote_uri=f"s3://{bucket}/run/checkpoints").prepare_resume()
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["deep", "deep/checkpoints"]
