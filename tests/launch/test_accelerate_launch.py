"""`accelerate launch --config_file launch/accelerate/*.yaml -m pretrain train` on CPU: the
real trainer in 2 processes, from the one-machine ZeRO-3 config and from the multi-machine
ZeRO-2 config (two launchers on this host as machines 0 and 1)."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from tests.launch.conftest import CONFIG, PYTHON, REPO, assert_finished, free_port, launcher_env, run_launcher, train_overrides

ACCELERATE = [PYTHON, "-m", "accelerate.commands.launch"]
CONFIGS = sorted((REPO / "launch" / "accelerate").glob("*.yaml"))


def engine_overrides(accelerate_config: Path) -> list[str]:
    """The stage and JSON each config's header comment tells users to pass."""
    ds_json = yaml.safe_load(accelerate_config.read_text())["deepspeed_config"]["deepspeed_config_file"]
    stage = int(Path(ds_json).stem.removeprefix("zero"))
    return [f"engine.zero_stage={stage}", f"engine.deepspeed_json={ds_json}"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_configs_are_deepspeed_with_a_template_that_exists(path):
    config = yaml.safe_load(path.read_text())
    assert config["distributed_type"] == "DEEPSPEED"
    assert (REPO / config["deepspeed_config"]["deepspeed_config_file"]).is_file()
    assert (config["num_machines"] > 1) == ("multinode" in path.name)
    if config["num_machines"] > 1:  # torchrun on each machine, no ssh
        assert config["deepspeed_config"]["deepspeed_multinode_launcher"] == "standard"
    assert " ".join(engine_overrides(path)) in path.read_text()  # the header shows the overrides


def test_one_machine_zero3_two_processes(tiny_shards, tmp_path):
    config = REPO / "launch" / "accelerate" / "zero3_1node.yaml"
    out = tmp_path / "run"
    run_launcher([
        *ACCELERATE, "--config_file", str(config), "--num_processes", "2", "--main_process_port", str(free_port()),
        "-m", "pretrain", "train", "--config", CONFIG, *engine_overrides(config),
        *train_overrides(tiny_shards, out, "train.steps=3"),
    ])
    assert_finished(out, world_size=2, steps=3, zero_stage=3)


def test_two_machines_zero2_one_process_each(tiny_shards, tmp_path):
    """Machines 0 and 1 are two launchers on 127.0.0.1, as on two hosts."""
    config = REPO / "launch" / "accelerate" / "zero2_multinode.yaml"
    out = tmp_path / "run"
    port = str(free_port())
    argv = [
        *ACCELERATE, "--config_file", str(config), "--num_machines", "2", "--num_processes", "2",
        "--main_process_ip", "127.0.0.1", "--main_process_port", port,
    ]
    trainer = ["-m", "pretrain", "train", "--config", CONFIG, *engine_overrides(config),
               *train_overrides(tiny_shards, out, "train.steps=3")]
    machine1 = subprocess.Popen([*argv, "--machine_rank", "1", *trainer], cwd=REPO, env=launcher_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        run_launcher([*argv, "--machine_rank", "0", *trainer])
        output, _ = machine1.communicate(timeout=120)
    finally:
        if machine1.poll() is None:
            machine1.kill()
            machine1.wait()
    assert machine1.returncode == 0, output[-5000:]
    assert_finished(out, world_size=2, steps=3, zero_stage=2)
