"""Shared pieces of the launcher tests: tiny real shards and the checks on a finished run.

Every launcher runs the real `python -m pretrain train` on the demo recipe shrunk to a few
steps of micro-batch 8 on 256 Fashion-MNIST images, so the tests measure the launchers,
not the training.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.fmnist import write_fmnist_shards

REPO = Path(__file__).resolve().parents[2]
CONFIG = "configs/pretrain/demo_fmnist.yaml"
PYTHON = sys.executable


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> str:
    """256 real Fashion-MNIST training images in 4 shards; returns the brace pattern."""
    return write_fmnist_shards(tmp_path_factory.mktemp("launch_shards"), "train", images=256, per_shard=64)


def train_overrides(shards: str, out_dir: Path, *extra: str) -> list[str]:
    """`key=value` overrides shrinking the demo recipe to a run of seconds."""
    return [
        f"data.train_urls={shards}", "data.val_urls=null", "data.batch_size=8", "data.num_workers=0",
        "train.log_every=2", f"train.output_dir={out_dir}",
        f"tracking.tracking_uri=sqlite:///{out_dir / 'mlflow.db'}",
        "tracking.experiment=test-launch", *extra,
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_env() -> dict[str, str]:
    """The test's environment minus any launcher variables it may itself run under."""
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith(("SLURM_", "TORCHELASTIC_"))}
    return env | {"PYTHONUNBUFFERED": "1"}


def run_launcher(argv: list[str], *, timeout: float = 300, env: dict[str, str] | None = None) -> str:
    """Run a launcher command from the repository root; fail with its output if it fails."""
    done = subprocess.run(argv, cwd=REPO, env=env or launcher_env(), capture_output=True, text=True, timeout=timeout)
    output = done.stdout + done.stderr
    if done.returncode != 0:
        pytest.fail(f"{' '.join(argv)} exited with {done.returncode}:\n{output[-6000:]}")
    return output


def finished_checkpoint(out_dir: Path) -> dict:
    """The meta of the checkpoint `latest` names (fails if there is none)."""
    latest = out_dir / "checkpoints" / "latest"
    assert latest.is_file(), f"no checkpoint in {out_dir}: {sorted(p.name for p in out_dir.rglob('*'))}"
    return json.loads((out_dir / "checkpoints" / latest.read_text().strip() / "meta.json").read_text())


def assert_finished(out_dir: Path, *, world_size: int, steps: int, zero_stage: int) -> dict:
    meta = finished_checkpoint(out_dir)
    assert meta["step"] == steps and meta["world_size"] == world_size, {k: meta[k] for k in ("step", "world_size")}
    assert meta["config"]["engine"]["zero_stage"] == zero_stage
    assert (out_dir / "export" / "model.safetensors").is_file()
    return meta

