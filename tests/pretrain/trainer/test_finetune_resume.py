"""The trainer's resume, seen through fine-tuning: a `python -m pretrain transfer` SIGKILLed after
its step-4 checkpoint reached S3, resumed in its folder and on a fresh folder from S3, draws the
uninterrupted run's loss curve exactly (same data order, augmentation, RNG and optimizer state)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from data_pipeline import storage
from pretrain.config import TransferConfig, load_config
from pretrain.tasks.finetune import run
from tests.pretrain.conftest import REPO
from tests.pretrain.transfer.conftest import export_tiny_model

RECIPE = "configs/transfer/demo_digits.yaml"
STEPS, CKPT = 8, 4
LOSS = "test/seed0/loss"


def transfer_args(tmp_path, name: str, *extra: str) -> list[str]:
    # constant lr: the killed run's length (1000 steps) does not change its curve
    return [f"model={tmp_path / 'export' / 'model.safetensors'}", "lr_grid=[]", "optim.decay=constant", "optim.warmup_steps=0",
            "data.batch_size=16", "data.augment=inception", "log_every=1", f"ckpt_every={CKPT}", f"output_dir={tmp_path / name}",
            f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", "tracking.experiment=finetune-resume",
            f"tracking.run_name={name}", *extra]


def history(tmp_path, name: str) -> dict[int, list[float]]:
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (found,) = client.search_runs([client.get_experiment_by_name("finetune-resume").experiment_id],
                                  filter_string=f"tags.mlflow.runName = '{name}'")
    out: dict[int, list[float]] = {}
    for m in client.get_metric_history(found.info.run_id, LOSS):
        out.setdefault(m.step, []).append(m.value)
    return out


def kill_after_checkpoint(tmp_path, uri: str, env: dict[str, str]) -> int:
    """`python -m pretrain transfer` with one loader worker, SIGKILLed once step CKPT is on S3."""
    args = transfer_args(tmp_path, "killed", f"remote_uri={uri}", "steps=1000", "data.num_workers=1")
    log = tmp_path / "killed.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pretrain", "transfer", "--config", RECIPE, *args], cwd=REPO, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    latest = storage.join_url(uri, "digits", "test", "seed0", "checkpoints", "latest")
    deadline = time.monotonic() + 300
    try:
        while storage.read_text(latest) != f"step{CKPT:08d}":
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the fine-tune ended or stalled before its step-{CKPT} checkpoint:\n{log.read_text()[-4000:]}")
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return proc.returncode


def test_killed_fine_tune_resumes_locally_and_from_s3_on_the_same_loss_curve(tmp_path, s3_server, monkeypatch,
                                                                                one_process_group, capsys):
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    export_tiny_model(tmp_path / "export" / "model.safetensors")
    uri = f"s3://{s3_server.create_bucket('finetune')}/killed"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    assert kill_after_checkpoint(tmp_path, uri, env | {"OMP_NUM_THREADS": "1"}) == -signal.SIGKILL

    def finetune(name: str, *extra: str) -> dict[str, float]:
        return run(load_config(TransferConfig, REPO / RECIPE, transfer_args(tmp_path, name, f"steps={STEPS}", *extra)),
                   one_process_group)

    full = finetune("full")
    resumed = finetune("killed", "resume=true")  # in its own folder
    local = capsys.readouterr().out
    fresh = finetune("fresh", "resume=true", f"remote_uri={uri}")  # an empty folder: the checkpoint comes from S3
    from_s3 = capsys.readouterr().out
    assert "resumed from step" in local
    assert f"downloaded checkpoint step{CKPT:08d}" in from_s3 and f"resumed from step{CKPT:08d} at step {CKPT}" in from_s3
    assert (tmp_path / "fresh" / "digits" / "test" / "seed0" / "checkpoints" / f"step{STEPS:08d}").is_dir()

    reference = history(tmp_path, "full")
    assert sorted(reference) == list(range(1, STEPS + 1))
    continued = history(tmp_path, "killed")  # one MLflow run: killed, resumed locally, resumed from S3
    assert sorted(continued) == list(range(1, STEPS + 1))
    for step, values in continued.items():
        # steps after the checkpoint are logged more than once (before the kill, after each resume): the same numbers
        assert values == [reference[step][0]] * len(values), step
    assert len(continued[STEPS]) >= 2
    assert resumed["top1"] == fresh["top1"] == full["top1"] and 0 <= full["top1"] <= 1
