"""The demo's rows: each is the number its printed command produces, baselines included."""
from __future__ import annotations

import re
import subprocess
import sys

from pretrain.tasks import demo
from pretrain.tracking.tracker import MLflowTracker


def test_pixel_baseline_row_is_its_command():
    """Logistic regression on digits' raw 8x8 pixels: the bar a fine-tuned ViT has to clear (about 96 %)."""
    out = subprocess.run([sys.executable, "-m", "pretrain", "demo", "--row", "pixels-digits"], capture_output=True, text=True,
                         check=True).stdout
    assert 94 < float(re.search(r"top-1 ([\d.]+) %", out).group(1)) < 99


def test_few_shot_rows_come_from_the_cli_with_its_own_l2_choice(tiny_export, tracking_uri):
    argv = demo.fewshot_argv(tiny_export, uri=tracking_uri, run_name="fewshot-pretrained")
    assert "--l2" not in argv  # the CLI chooses l2 on the dev split, as a user running the row's command gets
    parent = MLflowTracker(tracking_uri=tracking_uri, experiment="vitscale-demo", run_name="demo")
    printed = subprocess.run([sys.executable, *argv, "--parent-run-id", parent.run_id], capture_output=True, text=True,
                             check=True).stdout
    metrics = demo.child_metrics(parent)["fewshot-pretrained"]  # what the demo's table reads
    for k in demo.SHOTS:
        assert f"{k:3d}-shot  {100 * metrics[f'fewshot/digits/{k}shot']:5.1f}" in printed  # the command prints the row
    assert "chosen on the dev splits" in printed
