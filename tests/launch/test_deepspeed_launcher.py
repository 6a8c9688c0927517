"""The `deepspeed` launcher on one node: `deepspeed --num_gpus 2 --no_local_rank --module
pretrain train ...` runs the real trainer as 2 ranks. On a machine without GPUs the launcher
still starts 2 processes (it only sets CUDA_VISIBLE_DEVICES=0,1) and the trainer uses gloo."""
from __future__ import annotations

from tests.launch.conftest import CONFIG, PYTHON, assert_finished, free_port, run_launcher, train_overrides


def test_deepspeed_launcher_two_ranks(tiny_shards, tmp_path):
    out = tmp_path / "run"
    output = run_launcher([
        # --no_local_rank: otherwise the launcher appends --local_rank=N to our arguments
        PYTHON, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
        "--no_local_rank", "--module", "pretrain", "train", "--config", CONFIG,
        *train_overrides(tiny_shards, out, "train.steps=3", "engine.zero_stage=1"),
    ])
    assert "dist_world_size=2" in output
    assert_finished(out, world_size=2, steps=3, zero_stage=1)
