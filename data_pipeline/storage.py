"""Openers for shard URLs: local paths and brace patterns (S3 and HTTP come through here too)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

import braceexpand


def expand_urls(pattern: str) -> list[str]:
    """`dir/name-{000000..000004}.tar` -> five URLs; `a.tar::b.tar` -> two."""
    urls = []
    for part in pattern.split("::"):
        urls.extend(braceexpand.braceexpand(part))
    return urls


def open_url(url: str) -> BinaryIO:
    """Open a shard for reading; local paths only here."""
    path = Path(url.removeprefix("file://"))
    if not path.is_file():
        raise FileNotFoundError(f"shard {url} does not exist; check the data URLs in the config")
    return open(path, "rb")


def write_atomic(path: str | Path, data: bytes) -> None:
    """Write to a temp name beside `path` and rename, so a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
