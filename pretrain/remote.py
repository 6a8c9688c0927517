"""Checkpoints and exports on S3 or any S3-compatible store (MinIO, SeaweedFS, Ceph).

boto3 reads the endpoint and credentials from the usual variables (`AWS_ENDPOINT_URL`,
`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION`) or `~/.aws/`.
Large files go up in parts, and an upload cut short (process killed, connection lost)
continues from the parts the store already holds. That part is written by hand because
boto3's transfer manager aborts a failed multipart upload and starts over. Downloads use
boto3's transfer manager (parallel ranged GETs), to a temp name and then renamed.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

PART_SIZE = 64 * 2**20  # S3 takes 5 MiB to 5 GiB per part and at most 10,000 parts


def is_remote(uri: str | Path) -> bool:
    return str(uri).startswith("s3://")


def split_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/a/b` -> ("bucket", "a/b")."""
    if not is_remote(uri):
        raise ValueError(f"{uri!r} is not an s3://bucket/key URI")
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not bucket:
        raise ValueError(f"{uri!r} names no bucket: write s3://bucket/key")
    return bucket, key.strip("/")


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])


def s3_client():
    import boto3
    from botocore.config import Config

    return boto3.client("s3", config=Config(retries={"mode": "standard", "max_attempts": 5}))


def _part_md5s(path: Path, part_size: int):
    with open(path, "rb") as f:
        while chunk := f.read(part_size):
            yield chunk, hashlib.md5(chunk).hexdigest()


def local_etag(path: str | Path, part_size: int = PART_SIZE) -> str:
    """The ETag S3 gives `path` when uploaded by `upload_file` with `part_size` parts."""
    path = Path(path)
    if path.stat().st_size <= part_size:
        return '"' + hashlib.md5(path.read_bytes()).hexdigest() + '"'
    digests = [bytes.fromhex(md5) for _, md5 in _part_md5s(path, part_size)]
    return '"' + hashlib.md5(b"".join(digests)).hexdigest() + f'-{len(digests)}"'


def _open_upload(client, bucket: str, key: str) -> tuple[str, dict[int, tuple[str, int]]]:
    """An unfinished multipart upload of `key` and its parts {number: (etag, size)}, or a new one."""
    pending = client.list_multipart_uploads(Bucket=bucket, Prefix=key).get("Uploads", [])
    pending = sorted((u for u in pending if u["Key"] == key), key=lambda u: u["Initiated"])
    if not pending:
        return client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"], {}
    upload_id = pending[-1]["UploadId"]
    parts: dict[int, tuple[str, int]] = {}
    for page in client.get_paginator("list_parts").paginate(Bucket=bucket, Key=key, UploadId=upload_id):
        parts.update({p["PartNumber"]: (p["ETag"], p["Size"]) for p in page.get("Parts", [])})
    return upload_id, parts


def upload_file(path: str | Path, uri: str, *, part_size: int = PART_SIZE, client=None) -> None:
    """Upload `path` to `uri`; a multipart upload left unfinished by an earlier try is continued:
    parts already stored with the same size and MD5 are not sent again."""
    client = client or s3_client()
    path = Path(path)
    bucket, key = split_uri(uri)
    if path.stat().st_size <= part_size:
        with open(path, "rb") as f:
            client.put_object(Bucket=bucket, Key=key, Body=f)
        return
    upload_id, stored = _open_upload(client, bucket, key)
    parts = []
    for number, (chunk, md5) in enumerate(_part_md5s(path, part_size), start=1):
        etag = f'"{md5}"'
        if stored.get(number) != (etag, len(chunk)):
            etag = client.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=chunk)["ETag"]
        parts.append({"PartNumber": number, "ETag": etag})
    client.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts})


def download_file(uri: str, path: str | Path, *, client=None) -> Path:
    client = client or s3_client()
    bucket, key = split_uri(uri)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        client.download_file(bucket, key, str(tmp))
    except client.exceptions.ClientError as err:
        if err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey"):
            raise FileNotFoundError(f"{uri} does not exist") from None
        raise
    os.replace(tmp, path)
    return path


def exists(uri: str, *, client=None) -> bool:
    client = client or s3_client()
    bucket, key = split_uri(uri)
    try:
        client.head_object(Bucket=bucket, Key=key)
        return True
    except client.exceptions.ClientError as err:
        if err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return False
        raise


def read_text(uri: str, *, client=None) -> str | None:
    """The object's text, or None when it does not exist."""
    client = client or s3_client()
    bucket, key = split_uri(uri)
    try:
        return client.get_object(Bucket=bucket, Key=key)["Body"].read().decode()
    except client.exceptions.NoSuchKey:
        return None


def write_text(uri: str, text: str, *, client=None) -> None:
    client = client or s3_client()
    bucket, key = split_uri(uri)
    client.put_object(Bucket=bucket, Key=key, Body=text.encode())


def list_keys(uri: str, *, client=None) -> dict[str, tuple[int, str]]:
    """Objects below the folder `uri`: {relative key: (size, etag)}."""
    client = client or s3_client()
    bucket, prefix = split_uri(uri)
    prefix = prefix + "/" if prefix else ""
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        out.update({o["Key"][len(prefix):]: (o["Size"], o["ETag"]) for o in page.get("Contents", [])})
    return out


def list_folders(uri: str, *, client=None) -> list[str]:
    """Names of the sub-folders directly below `uri`."""
    client = client or s3_client()
    bucket, prefix = split_uri(uri)
    prefix = prefix + "/" if prefix else ""
    names = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, Delimiter="/"):
        names += [p["Prefix"][len(prefix):].rstrip("/") for p in page.get("CommonPrefixes", [])]
    return sorted(names)


def upload_dir(local: str | Path, uri: str, *, skip=lambda rel: False, part_size: int = PART_SIZE, client=None) -> int:
    """Upload every file below `local` to the folder `uri` (`skip(relative_path)` leaves files
    out); files already there with the same size and ETag are skipped, so a second call after
    a crash sends only what is missing. Returns the number of files sent."""
    client = client or s3_client()
    local = Path(local)
    stored = list_keys(uri, client=client)
    sent = 0
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        rel = path.relative_to(local).as_posix()
        if skip(rel):
            continue
        if rel in stored and stored[rel][0] == path.stat().st_size and stored[rel][1] == local_etag(path, part_size):
            continue
        upload_file(path, join(uri, rel), part_size=part_size, client=client)
        sent += 1
    return sent


def download_dir(uri: str, local: str | Path, *, skip=lambda rel: False, client=None) -> Path:
    """Download the folder `uri` into `local` (made whole under a temp name, then renamed);
    `skip(relative_key)` leaves files out."""
    client = client or s3_client()
    local = Path(local)
    keys = [k for k in list_keys(uri, client=client) if not skip(k)]
    if not keys:
        raise FileNotFoundError(f"{uri} holds no files")
    tmp = local.with_name(f".{local.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for rel in keys:
        download_file(join(uri, rel), tmp / rel, client=client)
    shutil.rmtree(local, ignore_errors=True)
    os.replace(tmp, local)
    return local


def delete_folder(uri: str, *, client=None) -> None:
    client = client or s3_client()
    bucket, prefix = split_uri(uri)
    keys = list(list_keys(uri, client=client))
    for i in range(0, len(keys), 1000):
        client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": f"{prefix}/{k}"} for k in keys[i:i + 1000]]})
