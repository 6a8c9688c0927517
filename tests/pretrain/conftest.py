"""Fixtures for the pretrain tests: real Fashion-MNIST shards and a CLI runner."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_pipeline import sources
from data_pipeline.writer import write_split

FMNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def fmnist_shards(tmp_path_factory) -> dict[str, str]:
    """3000 real training images in 6 shards and 500 test images (Debian's dataset-fashion-mnist)."""
    if not (FMNIST_ROOT / "train-images-idx3-ubyte.gz").is_file():
        pytest.fail(f"Fashion-MNIST is missing in {FMNIST_ROOT}: run `make system-deps` (Debian's dataset-fashion-mnist)")
    out = tmp_path_factory.mktemp("fmnist")
    write_split(sources.fashion_mnist(FMNIST_ROOT, "train", limit=3000), out, prefix="train", split="train",
                samples_per_shard=500, class_names=sources.FASHION_MNIST_CLASSES)
    write_split(sources.fashion_mnist(FMNIST_ROOT, "test", limit=500), out, prefix="test", split="test",
                samples_per_shard=500, class_names=sources.FASHION_MNIST_CLASSES)
    return {"train": f"{out}/train-{{000000..000005}}.tar", "val": f"{out}/test-000000.tar", "dir": str(out)}


def _run_module(args: list[str], *, nproc: int = 1, timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    cmd = [sys.executable, *launcher, "-m", *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


@pytest.fixture(scope="session")
def run_module():
    """`run_module(["pretrain", "train", ...], nproc=2)` runs `python -m ...` from the repo root,
    under torchrun when nproc > 1, and fails the test with the output when it fails."""
    return _run_module
