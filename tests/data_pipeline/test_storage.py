"""Shards stream from S3 and HTTP servers on 127.0.0.1, survive dropped connections by
resuming at the byte offset, and bad credentials or URLs fail with a clear error."""
from __future__ import annotations

import http.server
import os
import re
import threading
from pathlib import Path

import pytest

from data_pipeline.storage import open_url, output_target
from tests.fixtures.s3_server import DroppingProxy

PAYLOAD = os.urandom(700_000)


@pytest.fixture
def aws_env(monkeypatch):
    """Point boto3's usual variables at a server; a fresh client per test."""
    from data_pipeline import storage

    def use(endpoint):
        for name, value in endpoint.env().items():
            monkeypatch.setenv(name, value)
        monkeypatch.delenv("AWS_PROFILE", raising=False)
        storage._s3_client_for.cache_clear()

    yield use
    storage._s3_client_for.cache_clear()


def test_s3_stream_resumes_at_the_byte_offset_after_a_dropped_connection(s3_server, s3_dropping_proxy, aws_env):
    bucket = s3_server.create_bucket()
    s3_server.client().put_object(Bucket=bucket, Key="shard.tar", Body=PAYLOAD)
    aws_env(s3_dropping_proxy.s3)
    s3_dropping_proxy.drop_after(200_000, times=2)
    with open_url(f"s3://{bucket}/shard.tar") as f:
        assert f.read() == PAYLOAD
        resumed_at = f.raw.resumed_at
    assert s3_dropping_proxy.drops == 2
    # two ranged GETs picked up mid-object, where the broken ones had stopped
    assert len(resumed_at) == 2 and 0 < resumed_at[0] < resumed_at[1] < len(PAYLOAD)


@pytest.mark.parametrize("bad", [{"AWS_SECRET_ACCESS_KEY": "wrong"}, {"AWS_ACCESS_KEY_ID": "nobody"}])
def test_s3_wrong_credentials_name_the_url_and_what_to_check(seaweedfs_s3, aws_env, monkeypatch, bad):
    bucket = seaweedfs_s3.create_bucket()
    seaweedfs_s3.client().put_object(Bucket=bucket, Key="a.tar", Body=b"x")
    aws_env(seaweedfs_s3)
    for name, value in bad.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(PermissionError, match=rf"s3://{bucket}/a.tar .*AWS_ACCESS_KEY_ID"):
        open_url(f"s3://{bucket}/a.tar")


def test_s3_missing_object_and_unreachable_endpoint(s3_server, aws_env, monkeypatch):
    bucket = s3_server.create_bucket()
    aws_env(s3_server)
    with pytest.raises(FileNotFoundError, match=f"s3://{bucket}/nope.tar does not exist"):
        open_url(f"s3://{bucket}/nope.tar")
    with pytest.raises(FileNotFoundError, match="s3://no-such-bucket-here/x.tar"):
        open_url("s3://no-such-bucket-here/x.tar")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # discard port: nothing listens
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setattr("data_pipeline.storage.STREAM_RETRIES", 0)
    from data_pipeline import storage

    storage._s3_client_for.cache_clear()
    with pytest.raises(ConnectionError, match=rf"s3://{bucket}/x.tar.*AWS_ENDPOINT_URL"):
        open_url(f"s3://{bucket}/x.tar")


def test_s3_target_uploads_whole_files_in_parts(s3_server, aws_env, monkeypatch):
    bucket = s3_server.create_bucket()
    aws_env(s3_server)
    monkeypatch.setattr("data_pipeline.storage.MULTIPART_BYTES", 5 << 20)  # S3's smallest part
    big = os.urandom(11 << 20)
    target = output_target(f"s3://{bucket}/shards/")
    for name, data in (("small.tar", PAYLOAD), ("big.tar", big)):
        temp = target.temp_path(name)
        temp.write_bytes(data)
        assert not target.exists(name)
        target.commit(temp, name)
        assert target.exists(name) and not temp.exists()
        assert s3_server.client().get_object(Bucket=bucket, Key=f"shards/{name}")["Body"].read() == data
    # S3 marks a multipart object's ETag with its part count
    assert s3_server.client().head_object(Bucket=bucket, Key="shards/big.tar")["ETag"].strip('"').endswith("-3")
    target.close()


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """http.server with `Range: bytes=N-` support (the stdlib handler ignores Range)."""

    def send_head(self):
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        path = Path(self.translate_path(self.path))
        if not match or not path.is_file():
            return super().send_head()
        data = path.read_bytes()
        start = int(match.group(1))
        self.send_response(206)
        self.send_header("Content-Length", str(len(data) - start))
        self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        f = open(path, "rb")
        f.seek(start)
        return f

    def log_message(self, *args):
        pass


@pytest.fixture
def http_root(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: RangeHandler(*a, directory=str(tmp_path)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield tmp_path, server.server_address[1]
    server.shutdown()


def test_http_stream_resumes_with_range_requests(http_root):
    root, port = http_root
    (root / "shard.tar").write_bytes(PAYLOAD)
    with DroppingProxy("127.0.0.1", port) as proxy:
        proxy.drop_after(300_000)
        with open_url(f"{proxy.endpoint_url}/shard.tar") as f:
            assert f.read() == PAYLOAD
            assert len(f.raw.resumed_at) == 1 and f.raw.resumed_at[0] > 0
        assert proxy.drops == 1


def test_http_missing_file_and_pipe_urls_are_refused(http_root):
    _, port = http_root
    with pytest.raises(FileNotFoundError, match=f"http://127.0.0.1:{port}/nope.tar does not exist"):
        open_url(f"http://127.0.0.1:{port}/nope.tar")
    with pytest.raises(ValueError, match="pipe"):
        open_url("pipe:aws s3 cp s3://b/k -")


def test_http_shard_set_takes_counts_from_info_json(http_root):
    from data_pipeline.sample import Sample
    from data_pipeline.stream import open_shard_set
    from data_pipeline.writer import read_info, write_split

    root, port = http_root
    write_split([Sample(f"k_{i}", b"\x89PNG", "png", i) for i in range(8)], root, prefix="train", samples_per_shard=5)
    (root / "train-000000.tar").rename(root / "renamed.tar")  # served, but not in the index: counted by reading
    shards = open_shard_set(f"http://127.0.0.1:{port}/train-000001.tar::http://127.0.0.1:{port}/renamed.tar")
    assert shards.lengths == [3, 5]
    assert read_info(f"http://127.0.0.1:{port}")["splits"]["train"]["num_samples"] == 8
