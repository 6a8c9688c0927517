"""S3 transfers against moto's server on 127.0.0.1: resumable multipart uploads and folders."""
from __future__ import annotations

import os

import pytest

from pretrain import remote

PART = 5 * 2**20  # S3's smallest part


class Crash(Exception):
    pass


def count_calls(client, operation: str) -> list:
    calls = []
    client.meta.events.register(f"before-parameter-build.s3.{operation}", lambda params, **kw: calls.append(params["PartNumber"]))
    return calls


def test_a_multipart_upload_cut_short_continues_with_the_missing_parts(s3_server, tmp_path):
    bucket = s3_server.create_bucket("remote")
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(2 * PART + 12345))  # 3 parts
    uri = f"s3://{bucket}/ckpt/big.bin"

    client = s3_server.client()
    sent = count_calls(client, "UploadPart")

    def crash_after_first_part(**kwargs):
        if len(sent) == 2:  # the process dies as the second part goes out
            raise Crash

    client.meta.events.register("before-send.s3.UploadPart", crash_after_first_part)
    with pytest.raises(Crash):
        remote.upload_file(big, uri, part_size=PART, client=client)
    assert not remote.exists(uri, client=client)  # nothing half-written is visible

    again = s3_server.client()
    resent = count_calls(again, "UploadPart")
    remote.upload_file(big, uri, part_size=PART, client=again)
    assert resent == [2, 3]  # part 1 was already stored
    remote.download_file(uri, tmp_path / "back.bin", client=again)
    assert (tmp_path / "back.bin").read_bytes() == big.read_bytes()
    assert again.head_object(Bucket=bucket, Key="ckpt/big.bin")["ETag"] == remote.local_etag(big, PART)
    assert again.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_folder_upload_sends_only_what_is_missing_and_downloads_whole(s3_server, tmp_path):
    bucket = s3_server.create_bucket("remote")
    client = s3_server.client()
    src = tmp_path / "step00000005"
    (src / "sub").mkdir(parents=True)
    (src / "a.pt").write_bytes(os.urandom(1000))
    (src / "sub" / "b.json").write_text('{"x": 1}')
    (src / "universal").mkdir()
    (src / "universal" / "skip.pt").write_bytes(b"x")
    uri = f"s3://{bucket}/run/checkpoints/step00000005"
    skip = lambda rel: rel.startswith("universal/")  # noqa: E731
    assert remote.upload_dir(src, uri, skip=skip, client=client) == 2
    assert remote.upload_dir(src, uri, skip=skip, client=client) == 0  # all there already
    (src / "a.pt").write_bytes(os.urandom(1000))  # same size, other content: sent again
    assert remote.upload_dir(src, uri, skip=skip, client=client) == 1
    assert remote.list_folders(f"s3://{bucket}/run/checkpoints", client=client) == ["step00000005"]

    back = remote.download_dir(uri, tmp_path / "back" / "step00000005", client=client)
    assert sorted(p.relative_to(back).as_posix() for p in back.rglob("*") if p.is_file()) == ["a.pt", "sub/b.json"]
    assert (back / "a.pt").read_bytes() == (src / "a.pt").read_bytes()
    remote.delete_folder(uri, client=client)
    assert remote.list_keys(uri, client=client) == {}
    with pytest.raises(FileNotFoundError, match="holds no files"):
        remote.download_dir(uri, tmp_path / "none", client=client)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        remote.download_file(f"s3://{bucket}/nope", tmp_path / "nope", client=client)


def test_uris_are_checked():
    assert remote.split_uri("s3://b/k/x.pt") == ("b", "k/x.pt")
    with pytest.raises(ValueError, match="s3://bucket/key"):
        remote.split_uri("/local/path")
    with pytest.raises(ValueError, match="names no bucket"):
        remote.split_uri("s3:///key")
