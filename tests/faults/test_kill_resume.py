"""`kill -9` of a random rank at 5 random steps of one 2-rank run, one of them during a checkpoint save."""
from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psutil

from pretrain.checkpoint.checkpointer import verify_files

REPO = Path(__file__).resolve().parents[2]
STEPS, CKPT, KILLS = 16, 3, 5


def launch(args: list[str], log: Path, env: dict) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "pretrain", "train", *args]
    with open(log, "a") as out:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def logged_step(db: Path) -> int:
    """The last step whose loss reached MLflow (log_every=1), read straight from the store."""
    if not db.is_file():
        return 0
    try:
        with sqlite3.connect(db, timeout=1) as con:
            return con.execute("SELECT MAX(step) FROM metrics WHERE key = 'loss'").fetchone()[0] or 0
    except sqlite3.OperationalError:  # the store is being created
        return 0


def ranks_of(proc: subprocess.Popen) -> dict[str, psutil.Process]:
    """torchrun's children are the ranks (their loader workers are grandchildren)."""
    try:
        return {p.environ().get("RANK"): p for p in psutil.Process(proc.pid).children()}
    except psutil.Error:  # a child exiting while it is read
        return {}


def kill_random_rank(proc: subprocess.Popen, rng: random.Random) -> int:
    ranks = ranks_of(proc)
    rank = rng.choice(sorted(ranks))
    ranks[rank].send_signal(signal.SIGKILL)
    proc.wait(timeout=120)
    return int(rank)


def wait_for(proc: subprocess.Popen, ready, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"the run ended or stalled before the fault:\n{log.read_text()[-4000:]}")
        time.sleep(0.005)


def check_latest(ckpts: Path) -> int:
    """The step `latest` names, after verifying that checkpoint against its manifest (0: none)."""
    if not (ckpts / "latest").is_file():
        return 0
    folder = ckpts / (ckpts / "latest").read_text()
    meta = json.loads((folder / "meta.json").read_text())
    verify_files(folder, meta)
    return meta["step"]


def test_kill9_of_a_random_rank_at_five_random_steps(small_shards, tmp_path):
    """kill -9 of a random rank at 5 random steps, one during a checkpoint save | the steps since the last checkpoint | each resume continues from `latest` (intact, manifest checked): every re-run step logs the same loss bit for bit; the data stream's position is exactly the step count"""
    rng = random.Random(int(os.environ.get("VITSCALE_FAULT_SEED", "0")))
    db, out, log = tmp_path / "mlflow.db", tmp_path / "run", tmp_path / "run.log"
    ckpts = out / "checkpoints"
    args = ["--config", "configs/pretrain/demo_fmnist.yaml", f"data.train_urls={small_shards}", "data.val_urls=null",
            "data.num_workers=1", "data.batch_size=16", "optim.warmup_steps=0", "optim.decay=constant", f"train.steps={STEPS}",
            f"train.ckpt_every={CKPT}", "train.keep_last=20", "train.log_every=1", f"train.output_dir={out}",
            "train.resume=true", f"tracking.tracking_uri=sqlite:///{db}", "tracking.experiment=faults"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env |= {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    during_save = rng.randrange(1, KILLS)  # which kill lands in a save
    kills = []
    for k in range(KILLS):
        start = max(check_latest(ckpts), logged_step(db))
        proc = launch(args, log, env)
        if k == during_save:  # a save in progress: its temp folder has files (stale ones are removed at resume)
            wait_for(proc, lambda: len(ranks_of(proc)) == 2 and logged_step(db) > start and any(ckpts.glob(".tmp-step*/*")), log)
        else:
            target = rng.randint(start + 1, min(start + CKPT + 1, STEPS - 1))
            wait_for(proc, lambda: len(ranks_of(proc)) == 2 and logged_step(db) >= target, log)
        before = sorted(p.name for p in ckpts.glob("step*"))
        rank = kill_random_rank(proc, rng)
        kills.append((rank, logged_step(db), check_latest(ckpts)))
        if k == during_save:  # the half-written one is not named latest; the previous one is whole
            assert (ckpts / "latest").read_text() in before or not before
    proc = launch(args, log, env)
    assert proc.wait(timeout=300) == 0, log.read_text()[-4000:]

    history: dict[int, set[float]] = {}
    with sqlite3.connect(db) as con:
        for step, value in con.execute("SELECT step, value FROM metrics WHERE key = 'loss'"):
            history.setdefault(step, set()).add(value)
    assert sorted(history) == list(range(1, STEPS + 1))
    assert all(len(values) == 1 for values in history.values()), {s: v for s, v in history.items() if len(v) > 1}
    redone = sum(1 for _ in sqlite3.connect(db).execute("SELECT step FROM metrics WHERE key = 'loss'")) - STEPS
    assert redone > 0, kills  # some steps ran twice (before a kill, after the resume), identically
    for folder in sorted(ckpts.glob("step*")):  # the stream's position = steps x batches per step: none skipped or repeated
        meta = json.loads((folder / "meta.json").read_text())
        assert meta["data"]["generations"][-1]["consumed_batches"] == meta["step"], folder
