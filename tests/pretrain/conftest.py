"""Fixtures for the pretrain tests: real Fashion-MNIST shards and a CLI runner."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.fmnist import write_fmnist_shards
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def fmnist_shards(tmp_path_factory) -> dict[str, str]:
    """3000 real training images in 6 shards and 500 test images (Debian's dataset-fashion-mnist)."""
    out = tmp_path_factory.mktemp("fmnist")
    return {"train": write_fmnist_shards(out, "train", images=3000, per_shard=500),
            "val": write_fmnist_shards(out, "test", images=500, per_shard=500), "dir": str(out)}


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
