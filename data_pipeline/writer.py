"""Write samples into WebDataset tar shards plus the `_info.json` index timm's reader_wds reads.

`write_source` converts an indexed source (see `sources.py`). Items are shuffled first by
default (`shuffle_seed`; None keeps the source's order): a class-sorted listing (an
ImageFolder, ImageNet-21k's per-synset tars) would otherwise give shards of one class, and
no bounded reader buffer can mix those back into i.i.d. batches. The shuffle is a seeded
bijection of the item indices (`permutation.py`: no permutation array, so JFT-300M from a
CSV plans in the memory its listing already takes), and `limit` keeps the first N items of
it, a seeded random subset. Shard boundaries are then planned up front from the items'
byte sizes, so every shard's contents are fixed before any is written. Processes then write whole shards in any order and the output is the same bytes
whatever their number; each shard is written under a temp name and put in place only when
complete, and `resume=True` skips the shards already in place. `write_split` writes an
iterable of samples in one process (no random access needed).
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from PIL import Image
from tqdm import tqdm

from data_pipeline.permutation import IndexPermutation
from data_pipeline.sample import Sample
from data_pipeline.shards import count_samples
from data_pipeline.sources import Source
from data_pipeline.storage import OutputTarget, join_url, open_url, output_target

log = logging.getLogger(__name__)

INFO_NAME = "_info.json"
SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """`1GB` -> 10**9, `512MiB` -> 2**29, `1000` -> 1000 bytes."""
    number = text.strip().upper().rstrip("S")
    unit = next((u for u in sorted(SIZE_UNITS, key=len, reverse=True) if u and number.endswith(u)), "")
    try:
        value = float(number[: len(number) - len(unit)])
    except ValueError:
        raise ValueError(f"shard size {text!r} is not a size; write e.g. 1GB, 256MB or 512MiB") from None
    if value <= 0:
        raise ValueError(f"shard size {text!r} must be positive")
    return int(value * SIZE_UNITS[unit])


def shard_name(prefix: str, k: int) -> str:
    """The file name of shard `k`: `prefix-000000.tar`, ..."""
    return f"{prefix}-{k:06d}.tar"


_BLOCK, _RECORD = tarfile.BLOCKSIZE, tarfile.RECORDSIZE
# ustar header fields after name, mode, uid, gid, size, mtime and the checksum, as tarfile writes
# them for a regular file with mode 0o444, owner 0 and mtime 0 (same bytes for the same samples)
_HEAD = b"0000444\0" + b"0000000\0" * 2
_TAIL = b"0" + bytes(100) + tarfile.POSIX_MAGIC  # type, link name, magic; owner names, devices and prefix empty


def member_header(name: str, size: int) -> bytes:
    """The 512-byte ustar header tarfile.addfile writes for this member (by hand: tarfile builds
    each header through TarInfo in about 100 us, which at 300M samples is 16 CPU-hours)."""
    raw = name.encode()
    if len(raw) > 100:
        raise ValueError(f"member name {name!r} is over 100 bytes, the ustar limit: use shorter keys")
    header = raw.ljust(100, b"\0") + _HEAD + b"%011o\0" % size + b"00000000000\0" + b" " * 8 + _TAIL
    header = header.ljust(_BLOCK, b"\0")
    return header[:148] + b"%06o\0" % sum(header) + header[155:]


def sample_members(sample: Sample) -> list[tuple[str, bytes]]:
    """The tar members of one sample, in webdataset's `key.field` naming."""
    if "." in sample.key or "/" in sample.key:
        raise ValueError(f"sample key {sample.key!r} must not contain '.' or '/' (webdataset splits on them)")
    members = [(f"{sample.key}.{sample.ext}", sample.image)]
    if isinstance(sample.label, int):
        members.append((f"{sample.key}.cls", str(sample.label).encode()))
    elif sample.label is not None:
        members.append((f"{sample.key}.labels.json", json.dumps(list(sample.label)).encode()))
    return members


def reencode_jpeg(sample: Sample, quality: int) -> Sample | None:
    """The sample's image as a JPEG at `quality` (only when asked: originals are kept otherwise);
    None, logged, when its bytes do not decode."""
    try:
        with Image.open(io.BytesIO(sample.image)) as img:
            buf = io.BytesIO()
            img.convert("RGB").save(buf, format="JPEG", quality=quality)
    except Exception as err:  # PIL raises many types for broken bytes
        log.warning("skipping %s: cannot re-encode it (%s)", sample.key, err)
        return None
    return Sample(sample.key, buf.getvalue(), "jpg", sample.label)


class ShardFile:
    """One shard written to a temp file and put in place by `commit`."""

    def __init__(self, target: OutputTarget, name: str):
        self.target, self.name = target, name
        self.temp = target.temp_path(name)
        self.temp.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.temp, "wb")
        self.count = 0
        self.bytes = 0

    def add(self, sample: Sample) -> None:
        for name, payload in sample_members(sample):
            self._file.write(member_header(name, len(payload)) + payload + bytes(-len(payload) % _BLOCK))
            self.bytes += _BLOCK + len(payload) + -len(payload) % _BLOCK
        self.count += 1

    def commit(self) -> int:
        end = self.bytes + 2 * _BLOCK  # two zero blocks, then zeros to a whole record, as tarfile closes
        self._file.write(bytes(2 * _BLOCK + -end % _RECORD))
        self._file.close()
        self.target.commit(self.temp, self.name)
        return self.count

    def discard(self) -> None:
        self._file.close()
        self.temp.unlink(missing_ok=True)


def split_info(split: str, filenames: list[str], lengths: list[int]) -> dict:
    return {"name": split, "num_samples": int(sum(lengths)), "filenames": filenames, "shard_lengths": [int(n) for n in lengths]}


def write_split(
    samples: Iterable[Sample],
    out_dir: str | Path,
    *,
    prefix: str,
    split: str = "train",
    samples_per_shard: int | None = None,
    shard_bytes: int | None = None,
    class_names: list[str] | None = None,
    total: int | None = None,
) -> dict:
    """Write `samples` as `prefix-000000.tar`... in `out_dir`; record the split in `_info.json`."""
    if not samples_per_shard and not shard_bytes:
        raise ValueError("give samples_per_shard or shard_bytes")
    target = output_target(out_dir)
    filenames, lengths = [], []
    shard: ShardFile | None = None
    for sample in tqdm(samples, total=total, desc=f"write {prefix}", unit="img", mininterval=2):
        if shard is None or (samples_per_shard and shard.count >= samples_per_shard) or (shard_bytes and shard.bytes >= shard_bytes):
            if shard is not None:
                lengths.append(shard.commit())
            filenames.append(shard_name(prefix, len(filenames)))
            shard = ShardFile(target, filenames[-1])
        shard.add(sample)
    if shard is not None:
        lengths.append(shard.commit())
    info = split_info(split, filenames, lengths)
    update_info(target, info, class_names)
    target.close()
    return info


# ---------------------------------------------------------------- indexed sources, in parallel

def item_order(count: int, *, limit: int | None, shuffle_seed: int | None) -> Callable[[np.ndarray], np.ndarray]:
    """Written item i -> source index: a seeded permutation (its first `limit` items: a random
    subset), or the source's order (with `limit`: a seeded random subset kept in that order)."""
    if shuffle_seed is None and limit is None:
        return lambda idx: np.asarray(idx, dtype=np.int64)
    perm = IndexPermutation(count, 0 if shuffle_seed is None else shuffle_seed)
    if shuffle_seed is not None:
        return perm
    subset = np.sort(perm(np.arange(min(limit, count))))
    return lambda idx: subset[idx]


def plan_shards(n: int, sizes: Callable[[np.ndarray], np.ndarray] | None = None, *, samples_per_shard: int | None = None,
                shard_bytes: int | None = None, chunk: int = 1 << 22) -> np.ndarray:
    """Shard boundaries [0, b1, ..., n]: fixed counts, or cuts where the running byte total of
    `sizes(items)` crosses each multiple of `shard_bytes` (vectorised, a chunk at a time: no
    per-item loop and no n-sized array at 300M items)."""
    if samples_per_shard:
        return np.unique(np.append(np.arange(0, n, samples_per_shard), n)).astype(np.int64)
    if not shard_bytes:
        raise ValueError("give samples_per_shard or shard_bytes")
    cuts, carry = [np.zeros(1, np.int64)], 0
    for lo in range(0, n, chunk):
        ends = carry + np.cumsum(sizes(np.arange(lo, min(lo + chunk, n))))
        marks = np.arange(carry // shard_bytes + 1, int(ends[-1]) // shard_bytes + 1, dtype=np.int64) * shard_bytes
        cuts.append(lo + np.searchsorted(ends, marks, side="left") + 1)
        carry = int(ends[-1])
    return np.unique(np.minimum(np.concatenate([*cuts, [n]]), n)).astype(np.int64)


@dataclass(frozen=True)
class WriteJob:
    """Everything a writing process needs (inherited through fork, not pickled)."""

    source: Source
    target: OutputTarget
    prefix: str
    bounds: np.ndarray
    order: Callable[[np.ndarray], np.ndarray]  # written item -> source index
    quality: int | None

    def name(self, k: int) -> str:
        return shard_name(self.prefix, k)

    def write(self, k: int) -> tuple[int, int, int]:
        """Shard k -> (k, samples written, unreadable items skipped)."""
        shard = ShardFile(self.target, self.name(k))
        skipped = 0
        last_key = None
        try:
            for i in self.order(np.arange(self.bounds[k], self.bounds[k + 1])).tolist():
                sample = self.source.load(i)
                if sample is not None and self.quality:
                    sample = reencode_jpeg(sample, self.quality)
                if sample is None:
                    skipped += 1
                    continue
                if sample.key == last_key:  # shuffled next to a namesake: equal keys would merge in the tar
                    sample = replace(sample, key=f"{sample.key}_{i}")
                last_key = sample.key
                shard.add(sample)
        except BaseException:
            shard.discard()
            raise
        return k, shard.commit(), skipped


_JOB: WriteJob | None = None


def _set_job(job: WriteJob) -> None:
    global _JOB
    _JOB = job


def _write_shard(k: int) -> tuple[int, int, int]:
    return _JOB.write(k)


def write_source(
    source: Source,
    out: str | Path,
    *,
    prefix: str,
    split: str = "train",
    samples_per_shard: int | None = None,
    shard_bytes: int | None = None,
    quality: int | None = None,
    processes: int = 1,
    resume: bool = False,
    limit: int | None = None,
    shuffle_seed: int | None = 0,
) -> dict:
    """Convert `source` into shards in `out` (a folder or s3://bucket/prefix); returns the split's index.
    `shuffle_seed=None` keeps the source's order."""
    if not len(source):
        raise ValueError(f"the {source.kind} source holds no items: nothing to write")
    target = output_target(out)
    n = len(source) if limit is None else min(limit, len(source))
    order = item_order(len(source), limit=limit, shuffle_seed=shuffle_seed)
    all_sizes = source.sizes() if shard_bytes else None
    bounds = plan_shards(n, lambda idx: all_sizes[order(idx)], samples_per_shard=samples_per_shard, shard_bytes=shard_bytes)
    job = WriteJob(source, target, prefix, bounds, order, quality)
    names = [job.name(k) for k in range(len(bounds) - 1)]
    plan = {
        "source": source.describe(), "limit": n, "quality": quality, "prefix": prefix, "shuffle_seed": shuffle_seed,
        "bounds": hashlib.sha1(bounds.tobytes()).hexdigest(),
    }
    progress_name = f"_progress-{prefix}.json"
    lengths: dict[int, int] = {}
    for stale in target.stale_temps(prefix):  # left by an interrupted run
        stale.unlink(missing_ok=True)

    def save_progress() -> None:
        target.write_bytes(progress_name, json.dumps({"plan": plan, "lengths": lengths}).encode())

    if resume:
        lengths = _finished_shards(target, progress_name, plan, names)
    save_progress()
    todo = [k for k in range(len(names)) if k not in lengths]
    skipped = 0
    bar = tqdm(total=n, initial=int(sum(bounds[k + 1] - bounds[k] for k in lengths)), desc=f"write {prefix}",
               unit="img", mininterval=2, smoothing=0.05)
    saved_at = time.monotonic()

    def finished(k: int, count: int, bad: int) -> None:
        nonlocal saved_at, skipped
        lengths[k] = count
        skipped += bad
        bar.update(int(bounds[k + 1] - bounds[k]))
        if time.monotonic() - saved_at > 10:  # for --resume; a crash loses at most 10 s of records
            save_progress()
            saved_at = time.monotonic()

    if processes <= 1 or len(todo) <= 1:
        for k in todo:
            finished(*job.write(k))
    else:
        context = multiprocessing.get_context("fork")  # the source's listing is inherited, not pickled
        with ProcessPoolExecutor(processes, mp_context=context, initializer=_set_job, initargs=(job,)) as pool:
            for future in as_completed([pool.submit(_write_shard, k) for k in todo]):
                finished(*future.result())
    bar.close()
    if skipped:
        log.warning("skipped %d unreadable source items (see the warnings above)", skipped)
    info = split_info(split, names, [lengths[k] for k in range(len(names))])
    update_info(target, info, source.class_names)
    target.delete(progress_name)
    target.close()
    return info


def _finished_shards(target: OutputTarget, progress_name: str, plan: dict, names: list[str]) -> dict[int, int]:
    """Shards an interrupted run put in place, with their sample counts."""
    raw = target.read_bytes(progress_name)
    if raw is None:
        raise FileNotFoundError(f"nothing to resume in {target.url}: {progress_name} is missing; run without --resume")
    progress = json.loads(raw)
    if progress["plan"] != plan:
        raise ValueError(
            f"cannot resume in {target.url}: the source or options differ from the interrupted run "
            f"(was {progress['plan']}, now {plan}); run without --resume to start over"
        )
    recorded = {int(k): v for k, v in progress["lengths"].items()}
    done = {}
    present = target.names(f"{plan['prefix']}-")
    for k, name in enumerate(names):
        if name in present:  # shards finished after the last progress save are counted by reading
            done[k] = recorded[k] if k in recorded else count_samples(join_url(target.url, name))
    log.info("resuming: %d of %d shards already written", len(done), len(names))
    return done


# ---------------------------------------------------------------- the index

def update_info(out: str | Path | OutputTarget, split: dict, class_names: list[str] | None) -> None:
    """Record `split` (and the class names) in the folder's `_info.json`, keeping other splits."""
    target = output_target(out) if isinstance(out, (str, Path)) else out
    raw = target.read_bytes(INFO_NAME)
    info = json.loads(raw) if raw else {"name": Path(target.url.rstrip("/")).name, "splits": {}}
    info["splits"][split["name"]] = split
    if class_names is not None:
        info["class_names"] = list(class_names)
        info["num_classes"] = len(class_names)
    target.write_bytes(INFO_NAME, json.dumps(info, indent=1).encode())


def read_info(out: str | Path) -> dict:
    """The `_info.json` of a shard folder (local, s3:// or http(s)://)."""
    url = join_url(out, INFO_NAME)
    try:
        with open_url(url) as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{url} is missing: write shards with `python -m data_pipeline write`") from None


def shard_urls(root: str | Path, split: dict) -> list[str]:
    """The URLs of a split's shards in `root` (as `_info.json` lists them)."""
    return [join_url(root, name) for name in split["filenames"]]
