"""Where shards live: local paths, `s3://bucket/key` (boto3) and `http(s)://` URLs.

Reading goes through `open_url`, which streams an object and, when the connection breaks
mid-object, reopens it with a ranged request at the byte offset reached (`ResumingReader`),
so a shard is neither re-read from the start nor dropped. Writing goes through
`output_target`, which puts finished files in place atomically (rename locally, a completed
multipart upload on S3). There are deliberately no `pipe:` URLs: nothing from a config runs
as a shell command.
"""
from __future__ import annotations

import io
import logging
import os
import shutil
import tempfile
import time
import urllib.error
import urllib.request
from functools import lru_cache
from pathlib import Path
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
# Bytes asked of the connection per read: what a break can lose, as clients drop a partial read.
CHUNK = 64 << 10


def expand_urls(pattern: str) -> list[str]:
    """`dir/name-{000000..000004}.tar` -> five URLs; `a.tar::b.tar` -> two."""
    urls = []
    for part in pattern.split("::"):
        urls.extend(braceexpand.braceexpand(part))
    return urls


def scheme_of(url: str) -> str:
    return url.split("://", 1)[0].lower() if "://" in url else "file"


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
    bucket, _, key = url.removeprefix("s3://").partition("/")
    if not bucket:
        raise ValueError(f"{url} names no bucket; expected s3://bucket/key")
    return bucket, key


@lru_cache(maxsize=None)
def _s3_client_for(pid: int):
    """One client per process: boto3 clients must not cross a fork into loader workers.

    Endpoint, region and credentials come from boto3's usual chain: AWS_ENDPOINT_URL,
    AWS_DEFAULT_REGION, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ~/.aws/*.
    """
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"mode": os.environ.get("AWS_RETRY_MODE", "standard"), "max_attempts": int(os.environ.get("AWS_MAX_ATTEMPTS", 5))},
        connect_timeout=10, read_timeout=READ_TIMEOUT_S,
    )
    return boto3.session.Session().client("s3", config=config)


def s3_client():
    return _s3_client_for(os.getpid())


_S3_MISSING = {"NoSuchKey", "NoSuchBucket", "404", "NotFound"}
_S3_REFUSED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "ExpiredToken",
               "InvalidToken", "AuthorizationHeaderMalformed", "AllAccessDisabled"}
S3_CREDENTIALS_HINT = (
    "check the credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE), "
    "the endpoint (AWS_ENDPOINT_URL for stores other than AWS) and that they may access this bucket"
)


def s3_error(err: Exception, url: str) -> Exception:
    """botocore's exception -> one that names the URL and says what to do."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError, PartialCredentialsError

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

def write_atomic(path: str | Path, data: bytes) -> None:
    """Write to a temp name beside `path` and rename, so a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


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
        os.replace(temp, self.root / name)

    def stale_temps(self, prefix: str) -> Iterator[Path]:
        return self.root.glob(f".{prefix}-*.tmp*")

    def close(self) -> None:
        pass


class S3Target:
    """Files are written to a local temp folder and uploaded whole: boto3 splits big ones
    into a multipart upload, and the object appears only once the upload completes."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.bucket, prefix = split_s3(self.url)
        self.prefix = f"{prefix}/" if prefix else ""
        self._tmp = Path(tempfile.mkdtemp(prefix="shards-upload-"))
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as err:
            raise s3_error(err, self.url) from err

    @property
    def client(self):
        return s3_client()  # per process: the writer's processes are forked

    def _call(self, name: str, method: str, **kwargs):
        try:
            return getattr(self.client, method)(Bucket=self.bucket, Key=self.prefix + name, **kwargs)
        except Exception as err:
            raise s3_error(err, f"{self.url}/{name}") from err

    def exists(self, name: str) -> bool:
        try:
            self._call(name, "head_object")
            return True
        except FileNotFoundError:
            return False

    def names(self, prefix: str) -> set[str]:
        """Object names under `prefix`: one listing call per 1000 (not a request per shard)."""
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix + prefix)
            return {item["Key"][len(self.prefix):] for page in pages for item in page.get("Contents", [])}
        except Exception as err:
            raise s3_error(err, f"{self.url}/{prefix}") from err

    def read_bytes(self, name: str) -> bytes | None:
        try:
            return self._call(name, "get_object")["Body"].read()
        except FileNotFoundError:
            return None

    def write_bytes(self, name: str, data: bytes) -> None:
        self._call(name, "put_object", Body=data)

    def delete(self, name: str) -> None:
        self._call(name, "delete_object")

    def temp_path(self, name: str) -> Path:
        return self._tmp / f"{name}.{os.getpid()}"

    def commit(self, temp: Path, name: str) -> None:
        from boto3.s3.transfer import TransferConfig

        try:
            self.client.upload_file(str(temp), self.bucket, self.prefix + name,
                                    Config=TransferConfig(multipart_threshold=MULTIPART_BYTES, multipart_chunksize=MULTIPART_BYTES))
        except Exception as err:
            raise s3_error(err, f"{self.url}/{name}") from err
        finally:
            temp.unlink(missing_ok=True)

    def stale_temps(self, prefix: str) -> Iterator[Path]:
        return iter(())  # unfinished multipart uploads are aborted by boto3 on failure

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
