"""Bad input on the command line: one line naming the thing and what to do, exit code 2."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BAD = "data:\n  train_urls: x.tar\nmodel:\n  name: vit_demo\n  colour: blue\ntrain:\n  steps: -1\n"


def run(args: list[str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "VITSCALE_DEBUG")}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def ours(result: subprocess.CompletedProcess, prog: str = "python -m pretrain") -> list[str]:
    """The lines the command printed itself (libraries may warn at import, e.g. torch without CUDA)."""
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith(prog)]


def test_a_bad_config_prints_at_most_three_lines_and_exits_2(tmp_path):
    """a recipe with an unknown key and a negative step count | nothing (no work started) | one line naming the file and each key, exit 2; the traceback only with --debug"""
    (tmp_path / "BAD.yaml").write_text(BAD)
    result = run(["-m", "pretrain", "train", "--config", str(tmp_path / "BAD.yaml")])
    lines = ours(result)
    assert result.returncode == 2 and len(lines) == 2 and len((result.stdout + result.stderr).strip().splitlines()) <= 3, lines
    assert "Traceback" not in result.stderr
    assert f"invalid config {tmp_path / 'BAD.yaml'}: " in lines[0] and "model.colour: unknown key" in lines[0]
    assert "train.steps: Input should be greater than 0" in lines[0]


def test_the_traceback_only_when_asked(tmp_path, monkeypatch, capsys):
    """the same error with --debug or VITSCALE_DEBUG=1 | nothing | the exception propagates with its traceback"""
    from data_pipeline.errors import run_cli
    from pretrain.__main__ import main
    from pretrain.config import ConfigError

    (tmp_path / "BAD.yaml").write_text(BAD)
    argv = ["train", "--config", str(tmp_path / "BAD.yaml")]
    monkeypatch.delenv("VITSCALE_DEBUG", raising=False)
    assert run_cli("python -m pretrain", main, argv) == 2
    assert capsys.readouterr().err.startswith("python -m pretrain: error: invalid config")
    with pytest.raises(ConfigError):
        run_cli("python -m pretrain", main, [*argv, "--debug"])
    monkeypatch.setenv("VITSCALE_DEBUG", "1")
    with pytest.raises(ConfigError):
        run_cli("python -m pretrain", main, argv)


def test_a_missing_shard_folder_names_it_and_exits_2(tmp_path):
    """`data_pipeline verify` of a folder without shards | nothing | one line naming the missing index and the command that writes it, exit 2"""
    verify = run(["-m", "data_pipeline", "verify", str(tmp_path / "none")])
    assert verify.returncode == 2 and "Traceback" not in verify.stderr
    assert ours(verify, "python -m data_pipeline")[0].endswith(
        f"{tmp_path / 'none'}/_info.json is missing: write shards with `python -m data_pipeline write`")


def test_under_torchrun_one_rank_prints_the_error(tmp_path):
    """the bad recipe on 2 ranks under torchrun | nothing | the error line once (the first rank to fail), not once per rank"""
    (tmp_path / "BAD.yaml").write_text(BAD)
    result = run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "pretrain", "train",
                  "--config", str(tmp_path / "BAD.yaml")])
    assert result.returncode != 0
    assert [line for line in ours(result) if "error: invalid config" in line] == [ours(result)[0]], result.stderr[-3000:]
    assert ours(result)[0].endswith(")") and "(rank " in ours(result)[0]  # names the rank that printed
