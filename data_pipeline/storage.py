"""One storage layer for shards, checkpoints and exports: local paths, `s3://bucket/key`
(boto3) and `http(s)://` URLs.

Reading goes through `open_url`, which streams an object and, when the connection breaks
mid-object, reopens it with a ranged request at the byte offset reached (`ResumingReader`),
so a shard is neither re-read from the start nor dropped. Local files are written by
`atomic_path`/`write_atomic` (temp name, fsync, rename, fsync of the folder), so a crash
leaves the old file or the new one, never an empty or half one. S3 objects are written by
`upload_file`: a multipart upload whose parts go out in parallel and which, when cut short
(process killed, server restarted), continues with the parts the store does not hold yet.
One boto3 client per process and S3 settings (`s3_client`), made under a lock. Remote names
that become local paths pass `safe_join` first. There are deliberately no `pipe:` URLs:
nothing from a config runs as a shell command.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import shutil
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Callable, Iterator, Protocol

import braceexpand

log = logging.getLogger(__name__)

# A broken stream is reopened at most this many times in a row without progress, waiting
# BACKOFF_S * 2**k (capped at 8 s) before try k: about 16 s in all before giving up.
STREAM_RETRIES = 6
BACKOFF_S = 0.25
READ_TIMEOUT_S = 60
# Shards above this size go to S3 as a multipart upload of parts this size: a 1 GB shard is
# 16 parts, well under S3's limit of 10,000.
MULTIPART_BYTES = 64 << 20
# Parts of one upload sent at once: memory is UPLOAD_WORKERS x MULTIPART_BYTES.
UPLOAD_WORKERS = 4
# Bytes asked of the connection per read: what a break can lose, as clients drop a partial read.
CHUNK = 64 << 10


def expand_urls(pattern: str) -> list[str]:
    """`dir/name-{000000..000004}.tar` -> five URLs; `a.tar::b.tar` -> two."""
    urls = []
    for part in pattern.split("::"):
        urls.extend(braceexpand.braceexpand(part))
    return urls


def scheme_of(url: str | Path) -> str:
    url = str(url)
    return url.split("://", 1)[0].lower() if "://" in url else "file"


def is_s3(url: str | Path) -> bool:
    return scheme_of(url) == "s3"


def join_url(root: str | Path, *names: str) -> str:
    """`s3://b/run` + `checkpoints`, `latest` -> `s3://b/run/checkpoints/latest` (paths alike)."""
    return "/".join([str(root).rstrip("/"), *(n.strip("/") for n in names)])


def safe_join(root: str | Path, name: str) -> Path:
    """`root / name` for a relative `name` read from a remote store (a listed key, the tag in a
    `latest` object): refused when absolute, holding `..` or otherwise leading out of `root`."""
    parts = PurePosixPath(name).parts
    if not name or name.startswith(("/", "\\")) or "\\" in name or any(p in ("..", ".", "") for p in parts) or ":" in name:
        raise ValueError(f"refusing the remote name {name!r}: it would lead outside {root}; "
                         "the bucket holds an object not written by vitscale (check who writes to it)")
    path = Path(root) / Path(*parts)
    if not path.resolve().is_relative_to(Path(root).resolve()):
        raise ValueError(f"refusing the remote name {name!r}: {path} resolves outside {root}")
    return path


class Body(Protocol):
    def read(self, amt: int) -> bytes: ...
    def close(self) -> None: ...


# fetch(offset) -> (body from `offset` on, total object size, etag); raises FileNotFoundError,
# PermissionError (both final) or any other exception (retried).
Fetch = Callable[[int], tuple[Body, int, str | None]]


class ResumingReader(io.RawIOBase):
    """A read-only stream of one remote object that survives dropped connections.

    Hand-written because neither botocore's StreamingBody nor urllib resume a body that
    breaks mid-way; they raise, and webdataset's `pipe:aws s3 cp` loses the shard.
    """

    def __init__(self, url: str, fetch: Fetch):
        self.url, self._fetch = url, fetch
        self.offset = 0
        self.resumed_at: list[int] = []  # byte offsets of the ranged re-requests
        self._body, self.size, self._etag = self._open(0)

    def _open(self, offset: int) -> tuple[Body, int, str | None]:
        for attempt in range(STREAM_RETRIES + 1):
            try:
                return self._fetch(offset)
            except (FileNotFoundError, PermissionError):
                raise
            except Exception as err:  # connection refused, timeouts, 5xx: worth another try
                if attempt == STREAM_RETRIES:
                    raise ConnectionError(f"{self.url}: could not open at byte {offset} after {attempt + 1} tries: {err}") from err
                self._wait(attempt, err)
        raise AssertionError("unreachable")

    def _wait(self, attempt: int, err: BaseException) -> None:
        delay = min(BACKOFF_S * 2**attempt, 8.0)
        log.warning("%s: %s at byte %d; retrying in %.2f s", self.url, type(err).__name__, self.offset, delay)
        time.sleep(delay)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        want = len(buffer)
        failures = 0
        while self.offset < self.size and want:
            try:
                data = self._body.read(min(want, CHUNK))
                if not data:
                    raise ConnectionError(f"stream ended at byte {self.offset} of {self.size}")
            except Exception as err:  # botocore, urllib3 and http.client each raise their own types
                if failures == STREAM_RETRIES:
                    raise ConnectionError(f"{self.url}: stream broke {failures + 1} times at byte {self.offset}: {err}") from err
                self._wait(failures, err)
                failures += 1
                self._reopen()
                continue
            n = len(data)
            buffer[:n] = data
            self.offset += n
            return n
        return 0

    def _reopen(self) -> None:
        self._close_body()
        self._body, size, etag = self._open(self.offset)
        self.resumed_at.append(self.offset)
        if etag != self._etag or size != self.size:
            raise OSError(f"{self.url} changed while it was read (etag {self._etag} -> {etag}); restart the reader")

    def _close_body(self) -> None:
        try:
            self._body.close()
        except Exception:  # a broken connection may fail to close; it is dropped either way
            pass

    def close(self) -> None:
        if not self.closed:
            self._close_body()
        super().close()


def _buffered(raw: ResumingReader) -> BinaryIO:
    return io.BufferedReader(raw, buffer_size=1 << 20)


# ---------------------------------------------------------------- local files

def _open_file(url: str) -> BinaryIO:
    path = Path(url.removeprefix("file://"))
    if not path.is_file():
        raise FileNotFoundError(f"{url} does not exist; check the data URLs")
    return open(path, "rb")


# ---------------------------------------------------------------- s3://

def split_s3(url: str) -> tuple[str, str]:
    """`s3://bucket/a/b/` -> ("bucket", "a/b")."""
    if not is_s3(url):
        raise ValueError(f"{url!r} is not an s3://bucket/key URI")
    bucket, _, key = str(url)[len("s3://"):].partition("/")
    if not bucket:
        raise ValueError(f"{url} names no bucket; expected s3://bucket/key")
    return bucket, key.strip("/")


# The variables a client is made from: another endpoint or other credentials (tests switch
# servers between tests) make another client; the same ones reuse it.
CLIENT_SETTINGS = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                   "AWS_DEFAULT_REGION", "AWS_PROFILE", "AWS_RETRY_MODE", "AWS_MAX_ATTEMPTS")
_CLIENT_LOCK = threading.Lock()


@lru_cache(maxsize=None)
def _s3_client_for(pid: int, settings: tuple[str | None, ...]):
    """One client per process and settings: boto3 clients must not cross a fork into loader
    workers, and making clients from boto3's default session in two threads at once races
    (boto/boto3#1592), so each is made from its own Session under `_CLIENT_LOCK`. A made
    client is thread-safe; the checkpoint upload and the export upload share it.

    Endpoint, region and credentials come from boto3's usual chain: AWS_ENDPOINT_URL,
    AWS_DEFAULT_REGION, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ~/.aws/*.
    """
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"mode": os.environ.get("AWS_RETRY_MODE", "standard"), "max_attempts": int(os.environ.get("AWS_MAX_ATTEMPTS", 5))},
        connect_timeout=10, read_timeout=READ_TIMEOUT_S, max_pool_connections=4 * UPLOAD_WORKERS,
    )
    return boto3.session.Session().client("s3", config=config)


def s3_client():
    with _CLIENT_LOCK:
        return _s3_client_for(os.getpid(), tuple(os.environ.get(name) for name in CLIENT_SETTINGS))


def reset_s3_clients() -> None:
    """Drop the cached clients (a test that registered event hooks on one)."""
    with _CLIENT_LOCK:
        _s3_client_for.cache_clear()


_S3_MISSING = {"NoSuchKey", "NoSuchBucket", "404", "NotFound"}
_S3_REFUSED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "ExpiredToken",
               "InvalidToken", "AuthorizationHeaderMalformed", "AllAccessDisabled"}
S3_CREDENTIALS_HINT = (
    "check the credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE), "
    "the endpoint (AWS_ENDPOINT_URL for stores other than AWS) and that they may access this bucket"
)


def s3_error(err: Exception, url: str) -> Exception:
    """botocore's exception -> one that names the URL and says what to do."""
    from botocore.exceptions import ClientError, EndpointConnectionError, HTTPClientError, NoCredentialsError, PartialCredentialsError
    from botocore.exceptions import ConnectionError as BotoConnectionError

    if isinstance(err, ClientError):
        code = str(err.response.get("Error", {}).get("Code", ""))
        message = err.response.get("Error", {}).get("Message", "")
        if code in _S3_MISSING:
            return FileNotFoundError(f"{url} does not exist (S3: {code}); check the bucket and key in the URL")
        if code in _S3_REFUSED:
            return PermissionError(f"S3 refused {url} ({code}: {message}); {S3_CREDENTIALS_HINT}")
        return err
    if isinstance(err, (NoCredentialsError, PartialCredentialsError)):
        return PermissionError(f"no usable AWS credentials to read {url}: {err}; {S3_CREDENTIALS_HINT}")
    if isinstance(err, EndpointConnectionError):
        endpoint = os.environ.get("AWS_ENDPOINT_URL", "the AWS default endpoint")
        return ConnectionError(f"cannot reach S3 at {endpoint} for {url}: {err}; check AWS_ENDPOINT_URL and the network")
    if isinstance(err, (BotoConnectionError, HTTPClientError)):  # reset, closed or timed out mid-request
        return ConnectionError(f"the connection to S3 broke during {url}: {err}")
    return err


def _open_s3(url: str) -> BinaryIO:
    bucket, key = split_s3(url)
    client = s3_client()

    def fetch(offset: int):
        try:
            response = client.get_object(Bucket=bucket, Key=key, **({"Range": f"bytes={offset}-"} if offset else {}))
        except Exception as err:
            raise s3_error(err, url) from err
        return response["Body"], offset + int(response["ContentLength"]), response.get("ETag")

    return _buffered(ResumingReader(url, fetch))


# ---------------------------------------------------------------- http(s)://

def _open_http(url: str) -> BinaryIO:
    def fetch(offset: int):
        request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
        try:
            response = urllib.request.urlopen(request, timeout=READ_TIMEOUT_S)
        except urllib.error.HTTPError as err:
            if err.code in (404, 410):
                raise FileNotFoundError(f"{url} does not exist (HTTP {err.code}); check the data URLs") from None
            if err.code in (401, 403):
                raise PermissionError(f"{url} refused (HTTP {err.code}); the server wants credentials we do not send") from None
            raise
        length = int(response.headers.get("Content-Length", -1))
        if offset and response.status != 206:  # the server ignored Range: skip what we have
            remaining = offset
            while remaining:
                chunk = response.read(min(remaining, 1 << 20))
                if not chunk:
                    raise ConnectionError(f"{url} ended before byte {offset}")
                remaining -= len(chunk)
            return response, length, response.headers.get("ETag")
        if length < 0:
            raise OSError(f"{url}: the server sends no Content-Length; a broken stream could not be told from the end")
        return response, offset + length, response.headers.get("ETag")

    try:
        return _buffered(ResumingReader(url, fetch))
    except ConnectionError as err:
        raise ConnectionError(f"cannot reach {url}: {err}; check the URL and the network") from err


OPENERS: dict[str, Callable[[str], BinaryIO]] = {"file": _open_file, "s3": _open_s3, "http": _open_http, "https": _open_http}


def open_url(url: str) -> BinaryIO:
    """Open a shard (or `_info.json`) for reading: a path, `s3://bucket/key` or `http(s)://...`."""
    scheme = scheme_of(url)
    if scheme not in OPENERS:
        raise ValueError(
            f"unsupported URL {url!r}: use a local path, s3://bucket/key or http(s)://; "
            "`pipe:` commands are not run (a config must not run shell commands)"
        )
    return OPENERS[scheme](url)


# ---------------------------------------------------------------- writing

def _fsync(path: str | Path) -> None:
    """Flush a file's (or a folder's entries') data to the disk: without it a rename can reach
    the disk before the bytes, and after a power cut or node crash the new name is empty."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: str | Path) -> None:
    """fsync every file and folder below `folder`, then `folder` itself."""
    folder = Path(folder)
    for path in sorted(folder.rglob("*"), key=lambda p: -len(p.parts)):  # files before their folders
        _fsync(path)
    _fsync(folder)


def replace_durably(src: str | Path, dst: str | Path) -> None:
    """Rename `src` (a file or a folder whose contents are already synced) to `dst` and sync
    the folder holding it, so the new name survives a crash."""
    os.replace(src, dst)
    _fsync(Path(dst).parent)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temp name beside `path` for any writer (safetensors' `save_file`, PIL, bytes); when
    the block ends it is fsynced and renamed to `path`; when the block raises it is removed.
    A reader, or a crash, sees the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}-{threading.get_ident()}")
    try:
        yield tmp
        _fsync(tmp)
        replace_durably(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


# ---------------------------------------------------------------- S3 objects and folders

def _s3_call(url: str, method: str, **kwargs):
    bucket, key = split_s3(url)
    try:
        return getattr(s3_client(), method)(Bucket=bucket, Key=key, **kwargs)
    except Exception as err:
        raise s3_error(err, url) from err


def exists(url: str) -> bool:
    try:
        _s3_call(url, "head_object")
        return True
    except FileNotFoundError:
        return False


def read_text(url: str) -> str | None:
    """The object's text, or None when it does not exist."""
    try:
        return _s3_call(url, "get_object")["Body"].read().decode()
    except FileNotFoundError:
        return None


def write_text(url: str, text: str) -> None:
    _s3_call(url, "put_object", Body=text.encode())


def check_writable(url: str) -> None:
    """Fail now, with what to check, when `url`'s bucket cannot be reached or written
    (a probe object is put and deleted): not at the first checkpoint, hours in."""
    probe = join_url(url, ".vitscale-write-check")
    try:
        write_text(probe, "ok")
        _s3_call(probe, "delete_object")
    except (FileNotFoundError, PermissionError, ConnectionError) as err:
        raise type(err)(f"cannot write to {url}: {err}") from err
    except Exception as err:
        raise ConnectionError(f"cannot write to {url}: {err}; {S3_CREDENTIALS_HINT}") from err


def _listing(url: str, **kwargs) -> Iterator[dict]:
    bucket, prefix = split_s3(url)
    prefix = prefix + "/" if prefix else ""
    try:
        yield from s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, **kwargs)
    except Exception as err:
        raise s3_error(err, url) from err


def list_keys(url: str) -> dict[str, tuple[int, str]]:
    """Objects below the folder `url`: {relative key: (size, etag)}, one request per 1000."""
    cut = len(split_s3(url)[1]) + 1 if split_s3(url)[1] else 0
    return {o["Key"][cut:]: (o["Size"], o["ETag"]) for page in _listing(url) for o in page.get("Contents", [])}


def list_folders(url: str) -> list[str]:
    """Names of the sub-folders directly below `url`."""
    cut = len(split_s3(url)[1]) + 1 if split_s3(url)[1] else 0
    return sorted(p["Prefix"][cut:].rstrip("/") for page in _listing(url, Delimiter="/") for p in page.get("CommonPrefixes", []))


def delete_folder(url: str) -> None:
    bucket, prefix = split_s3(url)
    keys = [f"{prefix}/{k}" if prefix else k for k in list_keys(url)]
    for i in range(0, len(keys), 1000):
        s3_client().delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys[i:i + 1000]]})


def _part_ranges(size: int, part_size: int) -> list[tuple[int, int, int]]:
    """(part number, offset, length) of each part."""
    return [(n, offset, min(part_size, size - offset)) for n, offset in enumerate(range(0, size, part_size), start=1)]


def _read_range(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        return os.pread(f.fileno(), length, offset)


def local_etag(path: str | Path, part_size: int | None = None) -> str:
    """The ETag S3 gives `path` when `upload_file` sends it with parts of `part_size` bytes."""
    path, part_size = Path(path), part_size or MULTIPART_BYTES
    size = path.stat().st_size
    if size <= part_size:
        return '"' + hashlib.md5(path.read_bytes()).hexdigest() + '"'
    digests = [hashlib.md5(_read_range(path, off, n)).digest() for _, off, n in _part_ranges(size, part_size)]
    return '"' + hashlib.md5(b"".join(digests)).hexdigest() + f'-{len(digests)}"'


def _open_upload(client, bucket: str, key: str) -> tuple[str, dict[int, tuple[str, int]]]:
    """An unfinished multipart upload of `key` and its stored parts {number: (etag, size)}, or a new one."""
    pending = client.list_multipart_uploads(Bucket=bucket, Prefix=key).get("Uploads", [])
    pending = sorted((u for u in pending if u["Key"] == key), key=lambda u: u["Initiated"])
    if not pending:
        return client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"], {}
    upload_id = pending[-1]["UploadId"]
    parts: dict[int, tuple[str, int]] = {}
    for page in client.get_paginator("list_parts").paginate(Bucket=bucket, Key=key, UploadId=upload_id):
        parts.update({p["PartNumber"]: (p["ETag"], p["Size"]) for p in page.get("Parts", [])})
    return upload_id, parts


def upload_file(path: str | Path, url: str, *, part_size: int | None = None, workers: int | None = None) -> None:
    """Upload the file `path` to `url`; files above `part_size` as a multipart upload sending
    `workers` parts at once. A multipart upload left unfinished by an earlier try (the process
    killed, the server gone) is continued: parts already stored with the same size and MD5
    are not sent again. Written by hand because boto3's TransferManager aborts a failed
    multipart upload and starts over; the object appears only once the upload completes."""
    path, part_size = Path(path), part_size or MULTIPART_BYTES
    bucket, key = split_s3(url)
    size = path.stat().st_size
    if size <= part_size:
        with open(path, "rb") as f:
            _s3_call(url, "put_object", Body=f)
        return
    client = s3_client()
    try:
        upload_id, stored = _open_upload(client, bucket, key)

        def send(number: int, offset: int, length: int) -> dict:
            chunk = _read_range(path, offset, length)
            etag = f'"{hashlib.md5(chunk).hexdigest()}"'
            if stored.get(number) != (etag, length):
                etag = client.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=chunk)["ETag"]
            return {"PartNumber": number, "ETag": etag}

        with ThreadPoolExecutor(workers or UPLOAD_WORKERS, thread_name_prefix="s3-part") as pool:
            parts = list(pool.map(lambda r: send(*r), _part_ranges(size, part_size)))
        client.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts})
    except Exception as err:
        raise s3_error(err, url) from err


def download_file(url: str, path: str | Path) -> Path:
    """`url` to the local `path`, atomically (boto3's transfer manager: parallel ranged GETs)."""
    bucket, key = split_s3(url)
    with atomic_path(path) as tmp:
        try:
            s3_client().download_file(bucket, key, str(tmp))
        except Exception as err:
            raise s3_error(err, url) from err
    return Path(path)


def upload_dir(local: str | Path, url: str, *, skip: Callable[[str], bool] = lambda rel: False) -> int:
    """Upload every file below `local` to the folder `url` (`skip(relative_path)` leaves files
    out); files already there with the same size and ETag are skipped, so a second call after
    a crash sends only what is missing. Returns the number of files sent."""
    local = Path(local)
    stored = list_keys(url)
    sent = 0
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        rel = path.relative_to(local).as_posix()
        if skip(rel) or stored.get(rel) == (path.stat().st_size, local_etag(path)):
            continue
        upload_file(path, join_url(url, rel))
        sent += 1
    return sent


def download_dir(url: str, local: str | Path, *, keep: Callable[[str], bool] = lambda rel: True) -> Path:
    """Download the folder `url` (the keys `keep(relative_key)` accepts) into `local`, made
    whole under a temp name and then renamed. A key leading outside `local` is refused."""
    local = Path(local)
    keys = [k for k in list_keys(url) if keep(k)]
    if not keys:
        raise FileNotFoundError(f"{url} holds no files; check the URI (a train.remote_uri/checkpoints/<tag> folder)")
    tmp = local.with_name(f".{local.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    targets = {rel: safe_join(tmp, rel) for rel in keys}  # all checked before anything is written
    for rel, path in targets.items():
        download_file(join_url(url, rel), path)
    fsync_tree(tmp)
    shutil.rmtree(local, ignore_errors=True)
    replace_durably(tmp, local)
    return local


class OutputTarget(Protocol):
    """A folder (local or `s3://bucket/prefix`) that finished files are put into whole."""

    url: str

    def exists(self, name: str) -> bool: ...
    def names(self, prefix: str) -> set[str]: ...
    def read_bytes(self, name: str) -> bytes | None: ...
    def write_bytes(self, name: str, data: bytes) -> None: ...
    def delete(self, name: str) -> None: ...
    def temp_path(self, name: str) -> Path: ...
    def commit(self, temp: Path, name: str) -> None: ...
    def stale_temps(self, prefix: str) -> Iterator[Path]: ...
    def close(self) -> None: ...


class LocalTarget:
    def __init__(self, url: str):
        self.url = url
        self.root = Path(url.removeprefix("file://"))
        self.root.mkdir(parents=True, exist_ok=True)

    def exists(self, name: str) -> bool:
        return (self.root / name).is_file()

    def names(self, prefix: str) -> set[str]:
        return {p.name for p in self.root.glob(f"{prefix}*") if p.is_file()}

    def read_bytes(self, name: str) -> bytes | None:
        path = self.root / name
        return path.read_bytes() if path.is_file() else None

    def write_bytes(self, name: str, data: bytes) -> None:
        write_atomic(self.root / name, data)

    def delete(self, name: str) -> None:
        (self.root / name).unlink(missing_ok=True)

    def temp_path(self, name: str) -> Path:
        return self.root / f".{name}.tmp{os.getpid()}"

    def commit(self, temp: Path, name: str) -> None:
        _fsync(temp)
        replace_durably(temp, self.root / name)

    def stale_temps(self, prefix: str) -> Iterator[Path]:
        return self.root.glob(f".{prefix}-*.tmp*")

    def close(self) -> None:
        pass


class S3Target:
    """Files are written to a local temp folder and uploaded whole by `upload_file` (big ones
    in parts); the object appears only once the upload completes."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.bucket, prefix = split_s3(self.url)
        self.prefix = f"{prefix}/" if prefix else ""
        self._tmp = Path(tempfile.mkdtemp(prefix="shards-upload-"))
        try:
            s3_client().head_bucket(Bucket=self.bucket)
        except Exception as err:
            raise s3_error(err, self.url) from err

    def exists(self, name: str) -> bool:
        return exists(f"{self.url}/{name}")

    def names(self, prefix: str) -> set[str]:
        """Object names under `prefix`: one listing call per 1000 (not a request per shard)."""
        try:
            pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix + prefix)
            return {item["Key"][len(self.prefix):] for page in pages for item in page.get("Contents", [])}
        except Exception as err:
            raise s3_error(err, f"{self.url}/{prefix}") from err

    def read_bytes(self, name: str) -> bytes | None:
        try:
            return _s3_call(f"{self.url}/{name}", "get_object")["Body"].read()
        except FileNotFoundError:
            return None

    def write_bytes(self, name: str, data: bytes) -> None:
        _s3_call(f"{self.url}/{name}", "put_object", Body=data)

    def delete(self, name: str) -> None:
        _s3_call(f"{self.url}/{name}", "delete_object")

    def temp_path(self, name: str) -> Path:
        return self._tmp / f"{name}.{os.getpid()}"

    def commit(self, temp: Path, name: str) -> None:
        try:
            upload_file(temp, f"{self.url}/{name}")
        finally:
            temp.unlink(missing_ok=True)

    def stale_temps(self, prefix: str) -> Iterator[Path]:
        return iter(())  # an unfinished multipart upload is continued by the next commit of the name

    def close(self) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)


def output_target(url: str | Path) -> LocalTarget | S3Target:
    url = str(url)
    scheme = scheme_of(url)
    if scheme == "s3":
        return S3Target(url)
    if scheme == "file":
        return LocalTarget(url)
    raise ValueError(f"cannot write shards to {url!r}: use a local folder or s3://bucket/prefix")
