"""Find a data set's official files under a root folder, or inside its official archives.

`root` may be the folder the files sit in, a folder one level above it, an archive
(`.tar.gz`, `.tgz`, `.tar`), or a folder holding the official archives. Archives are unpacked
once into a cache folder keyed by their path, size and modification time, with tarfile's
"data" filter (no absolute paths, no `..`, no links out, no devices), under a temp name
then renamed, so concurrent ranks never see half an extraction.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")


class DatasetFormatError(ValueError):
    """A data set's files are missing or not in the official format; the message says what was expected."""


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vitscale" / "archives"


def is_archive(path: Path) -> bool:
    return path.is_file() and path.name.endswith(ARCHIVE_SUFFIXES)


def extracted(archive: Path) -> Path:
    """The folder `archive` unpacks to, unpacking it on first use."""
    stat = archive.stat()
    key = hashlib.sha1(f"{archive.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    out = cache_root() / f"{archive.name}-{key}"
    if out.is_dir():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{archive.name}.", dir=out.parent))
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
    except (tarfile.TarError, EOFError, OSError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DatasetFormatError(f"{archive} is not a readable tar archive ({err}); expected an official .tar.gz/.tgz") from None
    try:
        os.rename(tmp, out)
    except OSError:  # another rank finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _search(base: Path, marker: str) -> Path | None:
    """`base` or one of its sub-folders, whichever holds `marker`."""
    if (base / marker).exists():
        return base
    for child in sorted(p for p in base.iterdir() if p.is_dir()):
        if (child / marker).exists():
            return child
    return None


def locate(dataset: str, root: str | Path | None, marker: str, archives: tuple[str, ...], expects: str) -> Path:
    """The folder holding `marker` (a file or folder of the official layout) under `root`.

    Looks in `root` and its sub-folders, then inside `root` itself if it is an archive, then inside
    the archives in `root` named like `archives` (glob patterns: the official names). Raises
    DatasetFormatError saying what was expected.
    """
    if root is None:
        raise DatasetFormatError(f"{dataset} needs data.root (--data-root): {expects}")
    root = Path(root).expanduser()
    if not root.exists():
        raise DatasetFormatError(f"{dataset}: {root} does not exist; expected {expects}")
    if is_archive(root):
        found = _search(extracted(root), marker)
    elif root.is_dir():
        found = _search(root, marker)
        for archive in (p for pattern in archives for p in sorted(root.glob(pattern))):
            if found is None and is_archive(archive):
                found = _search(extracted(archive), marker)
    else:
        raise DatasetFormatError(f"{dataset}: {root} is neither a folder nor a .tar.gz/.tgz archive; expected {expects}")
    if found is None:
        listing = sorted(p.name for p in root.iterdir())[:10] if root.is_dir() else [root.name]
        raise DatasetFormatError(f"{dataset}: no {marker} under {root} (it holds {listing}); expected {expects}")
    return found
