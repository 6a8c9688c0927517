"""`bench/gpu_suite.sh --dry-run`: the GPU suite's code, run on the CPU with tiny models, so it cannot
rot while no GPU is lent; it prints every figure and writes no RESULTS.md row."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FIGURES = ["train/vit_b16/eager", "train/vit_b16/compiled", "train/vit_l16/eager", "train/vit_l16/compiled",
           "train/vit_h14/eager", "train/vit_h14/compiled", "loader_vs_demand", "mae_speedup", "zero3_vs_zero2"]


def test_dry_run_prints_every_figure_and_writes_no_rows(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("| date | device | command | result | goal |\n")
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in drop} | {"PY": sys.executable}
    proc = subprocess.run(["bench/gpu_suite.sh", "--dry-run", "--results", str(results)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    lines = {line.split(": ", 1)[0].removeprefix("DRY-RUN "): line.split(": ", 1)[1]
             for line in proc.stdout.splitlines() if line.startswith("DRY-RUN ")}
    assert sorted(lines) == sorted(FIGURES)
    for figure in FIGURES[:6]:
        samples_per_s = float(lines[figure].split("samples_per_s=")[1].split()[0])
        assert samples_per_s > 0 and "fused_attn=True" in lines[figure]  # timm's fused SDPA in every block
    assert float(lines["mae_speedup"].split("=")[1]) > 0
    assert results.read_text() == "| date | device | command | result | goal |\n"  # no row that reads as a GPU figure
