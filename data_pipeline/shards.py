"""Read samples out of tar shards in webdataset's layout, by position within a shard."""
from __future__ import annotations

import tarfile
from typing import BinaryIO, Callable, Iterator

RawSample = dict  # {"__key__": str, "__url__": str, "<field>": bytes, ...}


def split_name(name: str) -> tuple[str, str]:
    """`dir/abc.labels.json` -> (`dir/abc`, `labels.json`): webdataset's convention."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1 :])


def iter_tar_samples(stream: BinaryIO, url: str) -> Iterator[RawSample]:
    """Group consecutive members with the same key into samples.

    A truncated or corrupt tar raises `tarfile.TarError` (or EOFError) after the last
    complete sample; callers count what is missing.
    """
    mode = "r:" if stream.seekable() else "r|"
    with tarfile.open(fileobj=stream, mode=mode) as tar:
        current: RawSample | None = None
        for member in tar:
            if not member.isfile():
                continue
            key, field = split_name(member.name)
            if field == "" or key.startswith("_"):
                continue
            if current is not None and current["__key__"] != key:
                yield current
                current = None
            if current is None:
                current = {"__key__": key, "__url__": url}
            data = tar.extractfile(member).read()
            if len(data) != member.size:
                raise EOFError(f"{url}: member {member.name} is truncated")
            current[field] = data
        if current is not None:
            yield current


class UnreadableSample(Exception):
    """Stands in for sample `index` of shard `url` when the shard could not be read that far."""

    def __init__(self, url: str, index: int, cause: BaseException):
        super().__init__(f"{url}: sample {index} of the shard is unreadable: {cause}")
        # a cut tar is truncated; a connection that kept failing after retries is unreadable
        self.reason = "unreadable_shard" if isinstance(cause, OSError) and not isinstance(cause, EOFError) else "truncated_shard"


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
