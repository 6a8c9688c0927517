"""launch/slurm_pretrain.sh on a real two-node Slurm cluster: the real trainer on 2 nodes x
2 tasks, requeue on USR1 with resume from `latest`, and scancel that stays a cancel."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from tests.launch.conftest import CONFIG, PYTHON, REPO, assert_finished, train_overrides

SCRIPT = REPO / "launch" / "slurm_pretrain.sh"
# 2 nodes x 2 tasks on the test cluster's 2 CPUs and 2 stand-in GPUs per node.
TWO_BY_TWO = ("--nodes=2", "--ntasks-per-node=2", "--gpus-per-node=2", "--cpus-per-task=1", "--time=10")


def submit(cluster, out_dir: Path, *overrides: str, env=None) -> tuple[str, Path]:
    log = out_dir.parent / f"{out_dir.name}.slurm.out"
    job = cluster.submit(
        SCRIPT, CONFIG, *overrides, sbatch_args=(*TWO_BY_TWO, f"--output={log}"),
        env={"VITSCALE_PYTHON": PYTHON, **(env or {})}, cwd=REPO,
    )
    return job, log


def wait_for_line(cluster, job: str, log: Path, text: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not (log.is_file() and text in log.read_text()):
        if time.monotonic() > deadline:
            pytest.fail(f"job {job}: no {text!r} in its log after {timeout:.0f} s: {cluster.job(job)}")
        time.sleep(0.2)


def read(log: Path) -> str:
    return log.read_text(errors="replace")


@pytest.fixture(scope="module")
def four_rank_run(slurm_cluster, tiny_shards, tmp_path_factory):
    """One 4-step run of the real trainer over 2 nodes x 2 tasks."""
    out = tmp_path_factory.mktemp("slurm") / "run"
    job, log = submit(slurm_cluster, out, *train_overrides(tiny_shards, out, "train.steps=4"))
    info = slurm_cluster.wait(job, timeout=300)
    return {"job": job, "info": info, "log": log, "out": out, "shards": tiny_shards}


def test_two_nodes_two_tasks_each_train_as_four_ranks(four_rank_run):
    info, log = four_rank_run["info"], read(four_rank_run["log"])
    assert info["JobState"] == "COMPLETED", f"{info}\n{log[-4000:]}"
    assert info["NodeList"] == "node[1-2]" and info["NumTasks"] == "4" and info["Restarts"] == "0"
    # master = NodeAddr of the first node; port from the job id
    job = int(four_rank_run["job"])
    assert f"4 ranks, master 127.0.0.1:{15000 + job % 20000}" in log
    assert "train.resume=true" not in log.split("--config", 1)[0]  # banner lists the command, not the overrides
    assert "resumed from" not in log  # a fresh run starts from scratch despite train.resume=true
    assert_finished(four_rank_run["out"], world_size=4, steps=4, zero_stage=2)


def test_usr1_requeues_the_job_and_it_resumes_from_latest(slurm_cluster, four_rank_run, tmp_path):
    """`--signal=B:USR1@120` warns the script before the time limit; the test sends the same
    signal by hand. The requeued job resumes from the step-4 checkpoint and goes on to 6."""
    out = tmp_path / "run"
    shutil.copytree(four_rank_run["out"], out)
    job, log = submit(slurm_cluster, out, *train_overrides(four_rank_run["shards"], out, "train.steps=6"))
    wait_for_line(slurm_cluster, job, log, "(restart 0)")
    slurm_cluster.run("scancel", "--signal=USR1", "--batch", job)
    info = slurm_cluster.wait(job, timeout=300, states={"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"})
    text = read(log)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", f"{info}\n{text[-4000:]}"
    assert "USR1: requeueing job" in text and "(restart 1)" in text
    assert "resumed from step00000004 at step 4" in text
    assert_finished(out, world_size=4, steps=6, zero_stage=2)


def test_scancel_cancels_without_requeue(slurm_cluster, tmp_path):
    """scancel sends TERM too; the script must not turn it into a requeue. The payload is a
    stand-in that only sleeps: this is about the batch script's signal handling."""
    stand_in = tmp_path / "python"
    stand_in.write_text("#!/bin/sh\nprintf 'stand-in rank %s:' \"$SLURM_PROCID\"\nprintf ' [%s]' \"$@\"\necho\nexec sleep 120\n")
    stand_in.chmod(0o755)
    trap = tmp_path / "pwned"
    args = ("a.b=1", "with space=x", f"c=$(touch {trap})", "d=;touch${IFS}" + str(trap))
    job, log = submit(slurm_cluster, tmp_path / "run", *args, env={"VITSCALE_PYTHON": str(stand_in)})
    wait_for_line(slurm_cluster, job, log, "stand-in rank 3")
    slurm_cluster.run("scancel", job)
    info = slurm_cluster.wait(job, timeout=60)
    time.sleep(1)  # a requeue would show here as PENDING with Restarts=1
    info = slurm_cluster.job(job)
    text = read(log)
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", f"{info}\n{text}"
    assert "TERM: stopping; not requeued" in text
    # the arguments reached every rank as an argv array, one word each, never run by a shell
    argv = ["-m", "pretrain", "train", "--config", CONFIG, "train.resume=true", *args]
    assert text.count(":" + "".join(f" [{a}]" for a in argv)) == 4, text
    assert not trap.exists()
