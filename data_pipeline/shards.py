"""Read samples out of tar shards in webdataset's layout, by position within a shard."""
from __future__ import annotations

import tarfile
from typing import BinaryIO, Callable, Iterator

from data_pipeline.storage import open_url

RawSample = dict  # {"__key__": str, "__url__": str, "<field>": bytes, ...}


def split_name(name: str) -> tuple[str, str]:
    """`dir/abc.labels.json` -> (`dir/abc`, `labels.json`): webdataset's convention."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1 :])


def iter_tar_samples(stream: BinaryIO, url: str) -> Iterator[RawSample]:
    """Group consecutive members with the same key into samples.

    A truncated or corrupt tar raises `tarfile.ReadError` (or EOFError) after the last
    complete sample; callers count what is missing.
    """
    current: RawSample | None = None
    for name, data in iter_tar_members(stream, url):
        key, field = split_name(name)
        if field == "" or key.startswith("_"):
            continue
        if current is not None and current["__key__"] != key:
            yield current
            current = None
        if current is None:
            current = {"__key__": key, "__url__": url}
        current[field] = data
    if current is not None:
        yield current


_FILE_TYPES = (b"0", b"\0", b"7")  # regular and contiguous files; directories and links are skipped
_ZERO_BLOCK = bytes(512)
MAX_MEMBER_BYTES = 256 * 2**20  # one image (or label) larger than this is a corrupt or crafted header


class OversizedMember(tarfile.ReadError):
    """A member header claims more bytes than `MAX_MEMBER_BYTES`: nothing is allocated for it."""


def iter_tar_members(stream: BinaryIO, url: str) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each file in a tar stream (ustar, GNU long names, pax headers).

    Hand-written because `tarfile` parses all seventeen header fields in Python, about
    50 us a member: a tenth of a sample's decode. This reads the name, size and type.
    """
    long_name: str | None = None
    pax: dict[str, str] = {}
    while True:
        header = stream.read(512)
        if len(header) < 512 or header == _ZERO_BLOCK:
            if header and header != _ZERO_BLOCK:
                raise EOFError(f"{url}: tar header cut short")
            return  # end of archive (two zero blocks, or a writer that left them out)
        if _checksum(header) != _octal(header[148:156], url):
            raise tarfile.ReadError(f"{url}: bad tar header checksum")
        size = _pax_size(pax["size"], url) if "size" in pax else _octal(header[124:136], url)
        if size > MAX_MEMBER_BYTES:
            raise OversizedMember(f"{url}: member {pax.get('path') or long_name or _ustar_name(header)!r} claims {size} bytes, "
                                  f"over the {MAX_MEMBER_BYTES}-byte limit of one member (a corrupt or crafted tar header)")
        data = stream.read(size)
        if len(data) < size:
            raise EOFError(f"{url}: member cut short ({len(data)} of {size} bytes)")
        stream.read(-size % 512)
        kind = header[156:157]
        if kind == b"L":  # GNU long name of the next member
            long_name = data.rstrip(b"\0").decode(errors="surrogateescape")
            continue
        if kind in (b"x", b"g"):  # pax extended header: records "<len> <key>=<value>\n"
            if kind == b"x":
                try:
                    pax = dict(line.split("=", 1) for line in _pax_records(data))
                except ValueError:
                    raise tarfile.ReadError(f"{url}: malformed pax header") from None
            continue
        name = pax.get("path") or long_name or _ustar_name(header)
        long_name, pax = None, {}
        if kind in _FILE_TYPES:
            yield name, data


def _checksum(header: bytes) -> int:
    return sum(header[:148]) + 8 * 32 + sum(header[156:])  # the checksum field counts as spaces


def _octal(field: bytes, url: str) -> int:
    if field[:1] == b"\x80":  # GNU base-256 for sizes over 8 GiB
        return int.from_bytes(field[1:], "big")
    try:
        return int(field.split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        raise tarfile.ReadError(f"{url}: not a tar header (bad number {field!r})") from None


def _pax_size(text: str, url: str) -> int:
    if not text.isdigit():
        raise tarfile.ReadError(f"{url}: malformed pax size {text!r}")
    return int(text)


def _ustar_name(header: bytes) -> str:
    name = header[:100].split(b"\0", 1)[0].decode(errors="surrogateescape")
    prefix = header[345:500].split(b"\0", 1)[0].decode(errors="surrogateescape") if header[257:262] == b"ustar" else ""
    return f"{prefix}/{name}" if prefix else name


def _pax_records(data: bytes) -> Iterator[str]:
    """`key=value` of each pax record; a record's length counts bytes, not characters."""
    at = 0
    while at < len(data):
        space = data.index(b" ", at)
        end = at + int(data[at:space])
        yield data[space + 1 : end].rstrip(b"\n").decode(errors="surrogateescape")
        at = end


def count_samples(url: str) -> int:
    """Samples in the shard at `url`, counted by reading it through."""
    with open_url(url) as f:
        return sum(1 for _ in iter_tar_samples(f, url))


class UnreadableSample(Exception):
    """Stands in for sample `index` of shard `url` when the shard could not be read that far."""

    def __init__(self, url: str, index: int, cause: BaseException):
        super().__init__(f"{url}: sample {index} of the shard is unreadable: {cause}")
        # a cut tar is truncated; a connection that kept failing after retries is unreadable
        if isinstance(cause, OversizedMember):
            self.reason = "oversized_member"
        elif isinstance(cause, OSError) and not isinstance(cause, EOFError):
            self.reason = "unreadable_shard"
        else:
            self.reason = "truncated_shard"


class ShardCursor:
    """A sequential reader of one shard that can skip ahead; reopened when asked to go back."""

    def __init__(self, url: str, opener: Callable[[str], BinaryIO]):
        self.url, self._opener = url, opener
        self._reset()

    def _reset(self) -> None:
        self._stream = self._opener(self.url)
        self._samples = iter_tar_samples(self._stream, self.url)
        self.position = 0

    def read(self, offset: int, count: int) -> list[RawSample | UnreadableSample]:
        """Samples [offset, offset+count); an unreadable tail comes back as `UnreadableSample`s."""
        if offset < self.position:
            self.close()
            self._reset()
        out: list[RawSample | UnreadableSample] = []
        try:
            while self.position < offset:
                next(self._samples)
                self.position += 1
            while len(out) < count:
                out.append(next(self._samples))
                self.position += 1
        except (tarfile.TarError, EOFError, OSError, StopIteration) as err:
            cause = err if not isinstance(err, StopIteration) else EOFError("the shard ends early")
            first = offset + len(out)
            out.extend(UnreadableSample(self.url, first + i, cause) for i in range(count - len(out)))
            self.position = float("inf")  # the rest of this shard is gone: reopen to retry
        return out

    def close(self) -> None:
        self._stream.close()
