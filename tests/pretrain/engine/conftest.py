"""Training runs shared by the engine tests: five launches, each several runs of the real trainer.

All runs train the demo recipe's vit_demo on real Fashion-MNIST shards with the same global
batch of 32 (constant lr, so a run's length does not change its curve), log the loss every
step and checkpoint every 5 steps:

  single   1 rank, 2 loader workers x accumulation 2: the same samples per step as 2 ranks x 1
           worker (the data pipeline cuts the epoch into world x workers slots); checkpoints
           mirrored to s3://<bucket>/single
  zero0-3  2 ranks, ZeRO stage 0 to 3 (zero2 with EMA; zero3 with activation checkpointing and
           the few-shot hook); bf16: ZeRO-2, bf16, micro-batch 8 x accumulation 2; mae3: MAE at
           ZeRO-3 with the visualization hook
  killed   2 ranks via `python -m pretrain train`, mirrored to s3://<bucket>/killed, one rank
           killed with SIGKILL once the step-5 checkpoint is on S3
  resumed  2 ranks, an empty output folder: resumes the killed run from S3
  grow*    2 ranks from `single`'s step-5 checkpoint (1 -> 2 ranks); shrink* 1 rank from zero2's
           and zero3's (2 -> 1); *_noop runs train no step and re-save at the new world size
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from pretrain.config import PretrainConfig, dump_config, load_config

REPO = Path(__file__).resolve().parents[3]
CONFIG = "configs/pretrain/demo_fmnist.yaml"
STEPS, CKPT = 10, 5
EMA = "train.ema={decay: 0.9}"
FEWSHOT_ARGS = dict(datasets=["digits"], shots=[10], seeds=[0], max_train_per_class=20, max_test=200)
FEWSHOT = "train.fewshot=" + json.dumps({"every": 10, **FEWSHOT_ARGS})
MAE = ("train.objective=mae", "train.objective_kwargs={decoder_dim: 32, decoder_depth: 1, decoder_heads: 2}")


@dataclass
class Runs:
    root: Path
    recipe: str  # the demo recipe with the overrides every run shares, as one file
    db: Path
    bucket: str
    env: dict[str, str]  # for the launches: the S3 server's variables, no launcher variables

    def out(self, name: str) -> Path:
        return self.root / name

    @property
    def zero3(self) -> tuple[str, str]:
        return "engine.zero_stage=3", f"engine.deepspeed_json={self.root / 'zero3.json'}"

    def overrides(self, name: str, *extra: str) -> str:
        return shlex.join([f"train.output_dir={self.out(name)}", f"tracking.run_name={name}", *extra])

    def run_id(self, name: str) -> str:
        ckpts = self.out(name) / "checkpoints"
        return json.loads((ckpts / (ckpts / "latest").read_text() / "meta.json").read_text())["run_id"]

    def history(self, name: str, metric: str = "loss") -> dict[int, list[float]]:
        """Every logged value per step (a resumed run may log a step twice: before the kill and after)."""
        out: dict[int, list[float]] = {}
        for m in MlflowClient(f"sqlite:///{self.db}").get_metric_history(self.run_id(name), metric):
            out.setdefault(m.step, []).append(m.value)
        return out

    def copy_checkpoint(self, src: str, dst: str, step: int = CKPT) -> None:
        """`src`'s checkpoint at `step` as the only one of a new run (with a new MLflow run)."""
        tag = f"step{step:08d}"
        ckpts = self.out(dst) / "checkpoints"
        shutil.copytree(self.out(src) / "checkpoints" / tag, ckpts / tag, ignore=shutil.ignore_patterns("universal"))
        meta = json.loads((ckpts / tag / "meta.json").read_text())
        (ckpts / tag / "meta.json").write_text(json.dumps({**meta, "run_id": None}))
        (ckpts / "latest").write_text(tag)

    def read_remote(self, key: str):
        """A function returning the text of `s3://<bucket>/<key>` (None while it does not exist)."""
        import boto3

        env = self.env
        client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                              aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name=env["AWS_DEFAULT_REGION"])

        def read() -> str | None:
            try:
                return client.get_object(Bucket=self.bucket, Key=key)["Body"].read().decode()
            except client.exceptions.NoSuchKey:
                return None

        return read


def torchrun(nproc: int) -> list[str]:
    return ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []


def launch(runs: Runs, overrides: list[str], *, nproc: int) -> str:
    """`tests.pretrain.engine.multirun` over the runs' `overrides`, on `nproc` ranks; returns its output."""
    cmd = [sys.executable, *torchrun(nproc), "-m", "tests.pretrain.engine.multirun", "--config", runs.recipe]
    for o in overrides:
        cmd += ["--job", o]  # not --run: torchrun would take it for its --run-path
    proc = subprocess.run(cmd, cwd=REPO, env=runs.env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc.stdout + proc.stderr


@pytest.fixture(scope="session")
def runs(fmnist_shards, s3_server, tmp_path_factory) -> Runs:
    root = tmp_path_factory.mktemp("engine")
    db = root / "mlflow.db"
    common = [
        f"data.train_urls={fmnist_shards['train']}", "data.val_urls=null", "data.num_workers=1", "data.batch_size=16",
        "engine.global_batch=32", "optim.lr=5e-4", "optim.decay=constant", "optim.warmup_steps=0", f"train.steps={STEPS}",
        f"train.ckpt_every={CKPT}", "train.log_every=1", f"tracking.tracking_uri=sqlite:///{db}", "tracking.experiment=test-engine",
    ]
    # A raw DeepSpeed JSON override: ZeRO-3 partitions even the small tensors of vit_demo (by
    # default it keeps those under 1e5 elements whole), the position embedding among them.
    (root / "zero3.json").write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
    recipe = root / "recipe.yaml"  # JSON is YAML
    recipe.write_text(json.dumps(dump_config(load_config(PretrainConfig, REPO / CONFIG, common))))
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith(("SLURM_", "TORCHELASTIC_"))}
    # One thread per process, as torchrun sets it: OpenMP threads spinning on a busy machine are slow.
    env |= s3_server.env() | {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return Runs(root=root, recipe=str(recipe), db=db, bucket=s3_server.create_bucket("engine"), env=env)


@pytest.fixture(scope="session")
def single_run(runs) -> str:
    return launch(runs, [runs.overrides("single", "data.num_workers=2", f"train.remote_uri=s3://{runs.bucket}/single")], nproc=1)


@pytest.fixture(scope="session")
def zero_runs(runs) -> str:
    return launch(runs, [
        runs.overrides("zero0", "engine.zero_stage=0", "train.peak_flops=1e11"),
        runs.overrides("zero1", "engine.zero_stage=1"),
        runs.overrides("zero2", "engine.zero_stage=2", EMA),
        runs.overrides("zero3", *runs.zero3, "model.grad_checkpointing=true", FEWSHOT),
        runs.overrides("bf16", "engine.zero_stage=2", "engine.precision=bf16", "data.batch_size=8"),
        runs.overrides("mae3", *runs.zero3, *MAE, "train.steps=2", "train.ckpt_every=0",
                       "train.visualize_every=2"),
    ], nproc=2)


@pytest.fixture(scope="session")
def killed_run(runs) -> dict:
    """The CLI on 2 ranks, one rank SIGKILLed once its step-5 checkpoint is on S3."""
    uri = f"s3://{runs.bucket}/killed"
    args = ["-m", "pretrain", "train", "--config", runs.recipe, f"train.output_dir={runs.out('killed')}",
            "tracking.run_name=killed", f"train.remote_uri={uri}", "train.steps=1000"]
    log = runs.out("killed.log")
    with open(log, "w") as out:  # a file, not a pipe: nobody reads while it runs
        proc = subprocess.Popen([sys.executable, *torchrun(2), *args], cwd=REPO, env=runs.env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    latest = runs.read_remote("killed/checkpoints/latest")
    deadline = time.monotonic() + 600
    try:
        while latest() != f"step{CKPT:08d}":
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the run ended or stalled before its step-{CKPT} checkpoint reached S3:\n{log.read_text()[-5000:]}")
            time.sleep(0.05)
        # torchrun's own children are the ranks (their data loader workers are grandchildren)
        rank1 = [p for p in psutil.Process(proc.pid).children() if p.environ().get("RANK") == "1"]
        assert len(rank1) == 1, rank1
        rank1[0].send_signal(signal.SIGKILL)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return {"returncode": proc.returncode, "output": log.read_text(), "remote_latest": latest()}


@pytest.fixture(scope="session")
def two_rank_resumes(runs, single_run, killed_run) -> str:
    runs.copy_checkpoint("single", "grow_noop")
    runs.copy_checkpoint("single", "grow")
    return launch(runs, [
        runs.overrides("resumed", f"train.remote_uri=s3://{runs.bucket}/killed", "train.resume=true"),
        runs.overrides("grow_noop", "train.resume=true", f"train.steps={CKPT}"),
        runs.overrides("grow", "train.resume=true"),
    ], nproc=2)


@pytest.fixture(scope="session")
def one_rank_resumes(runs, zero_runs) -> str:
    runs.copy_checkpoint("zero2", "shrink_noop")
    runs.copy_checkpoint("zero2", "shrink")
    runs.copy_checkpoint("zero3", "shrink3_noop")
    return launch(runs, [
        runs.overrides("shrink_noop", "engine.zero_stage=2", EMA, "train.resume=true", f"train.steps={CKPT}"),
        runs.overrides("shrink", "engine.zero_stage=2", EMA, "train.resume=true"),
        runs.overrides("shrink3_noop", *runs.zero3, "train.resume=true", f"train.steps={CKPT}"),
    ], nproc=1)
