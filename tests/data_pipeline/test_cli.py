"""`python -m data_pipeline write | inspect | verify` on a real photo folder."""
from __future__ import annotations

import io
import subprocess
import sys
import tarfile

import pytest
from PIL import Image

from data_pipeline.__main__ import main
from data_pipeline.writer import read_info


@pytest.fixture
def shards(tmp_path, photos):
    for i in range(20):
        (tmp_path / "src" / ["bird", "fish"][i % 2]).mkdir(parents=True, exist_ok=True)
        (tmp_path / "src" / ["bird", "fish"][i % 2] / f"{i}.jpg").write_bytes(photos[i])
    out = tmp_path / "shards"
    assert main(["write", "--source", "imagefolder", "--input", str(tmp_path / "src"), "--output", str(out),
                 "--samples-per-shard", "6", "--processes", "2"]) == 0
    return out


def test_write_then_inspect(shards, tmp_path, capsys):
    assert read_info(shards)["splits"]["train"]["shard_lengths"] == [6, 6, 6, 2]
    sheet = tmp_path / "sheet.png"
    assert main(["inspect", str(shards), "--sheet", str(sheet), "--sheet-samples", "9"]) == 0
    out = capsys.readouterr().out
    assert "split train: 20 samples in 4 shards" in out
    assert "bird" in out and "fish" in out and out.count(" 10 #") == 2  # 10 of each class
    assert Image.open(sheet).size == (8 * 112, 2 * 126)


def test_verify_passes_clean_shards_and_lists_every_problem(shards, capsys):
    assert main(["verify", str(shards), "--processes", "2"]) == 0
    assert "no problems" in capsys.readouterr().out
    # corrupt: one garbled image and one out-of-range label in shard 1, shard 2 cut mid-member
    rewrite = {}
    with tarfile.open(shards / "train-000001.tar") as tar:
        for m in tar:
            rewrite[m.name] = tar.extractfile(m).read()
    keys = sorted({name.split(".")[0] for name in rewrite})
    rewrite[f"{keys[0]}.jpg"] = rewrite[f"{keys[0]}.jpg"][:200]
    rewrite[f"{keys[1]}.cls"] = b"7"
    with tarfile.open(shards / "train-000001.tar", "w") as tar:
        for name, data in rewrite.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = (shards / "train-000002.tar").read_bytes()
    (shards / "train-000002.tar").write_bytes(data[: len(data) // 2])
    assert main(["verify", str(shards)]) == 1
    out = capsys.readouterr().out
    assert f"PROBLEM undecodable: {shards}/train-000001.tar:{keys[0]}" in out
    assert f"PROBLEM bad_label: {shards}/train-000001.tar:{keys[1]}: labels [7] outside [0, 2)" in out
    assert "PROBLEM truncated_shard" in out and "train-000002.tar: _info.json says 6 samples" in out
    assert "problems: bad_label=1, index_mismatch=1, truncated_shard=1, undecodable=1" in out
    assert "checked" in out  # it went on to the end


def test_cli_runs_as_a_module_and_names_bad_input(tmp_path, capsys):
    result = subprocess.run([sys.executable, "-m", "data_pipeline", "write", "--source", "imagefolder", "--input",
                             str(tmp_path / "missing"), "--output", str(tmp_path / "out")], capture_output=True, text=True)
    assert result.returncode == 2 and f"image folder {tmp_path / 'missing'} does not exist" in result.stderr
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}/_info.json is missing"):
        main(["verify", str(tmp_path)])  # in-process the error is raised; the command line prints it in one line


def run_module(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "data_pipeline", *args], capture_output=True, text=True, timeout=120)


def test_inspect_names_a_truncated_shard_and_an_unknown_split_in_one_line(shards):
    data = (shards / "train-000001.tar").read_bytes()
    (shards / "train-000001.tar").write_bytes(data[: len(data) // 2])
    cut = run_module("inspect", str(shards), "--sheet", str(shards / "s.png"))
    assert cut.returncode == 2 and "Traceback" not in cut.stderr
    assert f"shard {shards}/train-000001.tar is unreadable after" in cut.stderr and "data_pipeline verify" in cut.stderr
    unknown = run_module("inspect", str(shards), "--split", "validation")
    assert unknown.returncode == 2 and "Traceback" not in unknown.stderr
    assert "has no split 'validation' (it has train); pass --split NAME" in unknown.stderr


def test_write_quality_skips_and_counts_a_corrupt_jpeg(tmp_path, photos, caplog):
    for i in range(6):
        (tmp_path / "src" / "a").mkdir(parents=True, exist_ok=True)
        (tmp_path / "src" / "a" / f"{i}.jpg").write_bytes(photos[i] if i != 3 else photos[i][:400])  # a JPEG cut short
    assert main(["write", "--source", "imagefolder", "--input", str(tmp_path / "src"), "--output", str(tmp_path / "out"),
                 "--quality", "50"]) == 0
    assert read_info(tmp_path / "out")["splits"]["train"]["num_samples"] == 5
    assert "cannot re-encode it" in caplog.text and "skipped 1 unreadable source items" in caplog.text
