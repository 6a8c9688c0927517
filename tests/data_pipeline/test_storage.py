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


# ---------------------------------------------------------------- S3 objects and folders (checkpoints, exports)

PART = 5 << 20  # S3's smallest part


class Crash(Exception):
    pass


@pytest.fixture
def s3(s3_server, aws_env):
    """The storage layer pointed at moto; clients dropped afterwards (tests hook events on them)."""
    from data_pipeline import storage

    aws_env(s3_server)
    yield s3_server
    storage.reset_s3_clients()


def part_calls(operation: str) -> list[tuple[int, str]]:
    """(part number, thread name) of each `operation` request the shared client sends."""
    import threading

    from data_pipeline import storage

    calls = []
    storage.s3_client().meta.events.register(
        f"before-send.s3.{operation}", lambda request, **kw: calls.append((int(request.url.split("partNumber=")[1].split("&")[0]),
                                                                            threading.current_thread().name)))
    return calls


def test_a_multipart_upload_sends_parts_in_parallel_and_a_cut_one_continues_with_the_missing_parts(s3, tmp_path):
    from data_pipeline import storage

    bucket = s3.create_bucket("parts")
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(4 * PART + 12345))  # 5 parts
    uri = f"s3://{bucket}/ckpt/big.bin"
    sent = part_calls("UploadPart")

    def crash_on_part_3(request, **kwargs):
        if "partNumber=3&" in request.url or request.url.endswith("partNumber=3"):
            raise Crash  # the connection dies as part 3 goes out

    storage.s3_client().meta.events.register("before-send.s3.UploadPart", crash_on_part_3)
    with pytest.raises(Crash):
        storage.upload_file(big, uri, part_size=PART, workers=2)
    assert not storage.exists(uri)  # nothing half-written is visible
    stored_before = {n for n, _ in sent} - {3}
    assert len({thread for _, thread in sent}) == 2  # two parts in flight at once

    storage.reset_s3_clients()
    resent = part_calls("UploadPart")
    storage.upload_file(big, uri, part_size=PART)
    assert sorted(n for n, _ in resent) == sorted({1, 2, 3, 4, 5} - stored_before)  # stored parts are not sent again
    storage.download_file(uri, tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == big.read_bytes()
    client = s3.client()
    assert client.head_object(Bucket=bucket, Key="ckpt/big.bin")["ETag"] == storage.local_etag(big, PART)
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_folder_upload_sends_only_what_is_missing_and_downloads_whole(s3, tmp_path):
    from data_pipeline import storage

    bucket = s3.create_bucket("folders")
    src = tmp_path / "step00000005"
    (src / "sub").mkdir(parents=True)
    (src / "a.pt").write_bytes(os.urandom(1000))
    (src / "sub" / "b.json").write_text('{"x": 1}')
    (src / "universal").mkdir()
    (src / "universal" / "skip.pt").write_bytes(b"x")
    uri = f"s3://{bucket}/run/checkpoints/step00000005"
    skip = lambda rel: rel.startswith("universal/")  # noqa: E731
    assert storage.upload_dir(src, uri, skip=skip) == 2
    assert storage.upload_dir(src, uri, skip=skip) == 0  # all there already
    (src / "a.pt").write_bytes(os.urandom(1000))  # same size, other content: sent again
    assert storage.upload_dir(src, uri, skip=skip) == 1
    assert storage.list_folders(f"s3://{bucket}/run/checkpoints") == ["step00000005"]

    back = storage.download_dir(uri, tmp_path / "back" / "step00000005")
    assert sorted(p.relative_to(back).as_posix() for p in back.rglob("*") if p.is_file()) == ["a.pt", "sub/b.json"]
    assert (back / "a.pt").read_bytes() == (src / "a.pt").read_bytes()
    storage.delete_folder(uri)
    assert storage.list_keys(uri) == {}
    with pytest.raises(FileNotFoundError, match="holds no files"):
        storage.download_dir(uri, tmp_path / "none")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        storage.download_file(f"s3://{bucket}/nope", tmp_path / "nope")


def test_a_listed_key_that_leads_out_of_the_folder_is_refused(s3, tmp_path):
    from data_pipeline import storage

    for key in ("../../evil.txt", "/etc/evil", "a/../../evil", "C:\\evil", ""):
        with pytest.raises(ValueError, match="outside"):
            storage.safe_join(tmp_path / "dest", key)
    assert storage.safe_join(tmp_path, "zero/a.pt") == tmp_path / "zero" / "a.pt"
    bucket = s3.create_bucket("hostile")
    s3.client().put_object(Bucket=bucket, Key="ckpt/ok.pt", Body=b"ok")
    s3.client().put_object(Bucket=bucket, Key="ckpt/../../evil.txt", Body=b"evil")  # S3 keys are any string
    assert "../../evil.txt" in storage.list_keys(f"s3://{bucket}/ckpt")
    with pytest.raises(ValueError, match="outside"):
        storage.download_dir(f"s3://{bucket}/ckpt", tmp_path / "dest" / "step1")
    assert not any(p.name == "evil.txt" for p in tmp_path.rglob("*"))


def test_uris_are_checked():
    from data_pipeline.storage import join_url, split_s3

    assert split_s3("s3://b/k/x.pt") == ("b", "k/x.pt") and split_s3("s3://b/run/") == ("b", "run")
    assert join_url("s3://b/run/", "checkpoints", "latest") == "s3://b/run/checkpoints/latest"
    with pytest.raises(ValueError, match="s3://bucket/key"):
        split_s3("/local/path")
    with pytest.raises(ValueError, match="names no bucket"):
        split_s3("s3:///key")


def test_one_client_per_process_while_a_checkpoint_and_an_export_upload_run_at_once(s3, tmp_path, monkeypatch):
    import threading

    import botocore.session

    from data_pipeline import storage
    from pretrain.checkpoint.checkpointer import upload_checkpoint
    from pretrain.checkpoint.export import upload_exported

    bucket = s3.create_bucket("threads")
    made = []
    create = botocore.session.Session.create_client
    monkeypatch.setattr(botocore.session.Session, "create_client", lambda self, *a, **kw: made.append(a) or create(self, *a, **kw))
    ckpt = tmp_path / "checkpoints" / "step00000002"
    ckpt.mkdir(parents=True)
    for i in range(3):
        (ckpt / f"part{i}.pt").write_bytes(os.urandom(PART + i))
    export = tmp_path / "model.safetensors"
    export.write_bytes(os.urandom(2 * PART))
    export.with_suffix(".json").write_text("{}")
    monkeypatch.setattr(storage, "MULTIPART_BYTES", PART)
    storage.reset_s3_clients()
    start = threading.Barrier(2)
    errors = []

    def run(fn, *args, **kwargs):
        try:
            start.wait()
            fn(*args, **kwargs)
        except Exception as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(upload_checkpoint, ckpt, f"s3://{bucket}/run/checkpoints"), kwargs={"keep_last": 2}),
               threading.Thread(target=run, args=(upload_exported, export, f"s3://{bucket}/run/export/model.safetensors"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert made == [("s3",)]  # one client, shared by both threads and their part uploads
    assert set(storage.list_keys(f"s3://{bucket}/run")) == {
        "checkpoints/latest", *(f"checkpoints/step00000002/part{i}.pt" for i in range(3)), "export/model.safetensors", "export/model.json"}
