"""ZeRO-3 construction under deepspeed.zero.Init on 2 gloo ranks: no rank holds a whole parameter,
timm's (and MAE's) init gives the very weights it gives without zero.Init, and the ViT-22B-shaped
tiny twin trains, exports, resamples and resumes (one launch: tests.pretrain.engine.zero_init_run)."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from pretrain.models import build_model, resize_pos_embed_in_state_dict
from tests.pretrain.engine.conftest import REPO

CONFIG = "configs/pretrain/demo_fmnist.yaml"


@pytest.fixture(scope="module")
def launched(fmnist_shards, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("zero_init")
    common = [
        f"data.train_urls={fmnist_shards['train']}", "data.val_urls=null", "data.batch_size=16", "data.image_size=32",
        "model.name=vit_22b_demo", "engine.zero_stage=3", "optim.warmup_steps=0", "optim.decay=constant",
        "train.ckpt_every=3", "train.log_every=1", f"train.output_dir={root / 'run'}",
        f"tracking.tracking_uri=sqlite:///{root / 'mlflow.db'}", "tracking.experiment=test-zero-init",
    ]
    jobs = [shlex.join([*common, "train.steps=6"]), shlex.join([*common, "train.steps=9", "train.resume=true"])]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "tests.pretrain.engine.zero_init_run", "--out", str(root / "result.json"), "--config", CONFIG]
    for job in jobs:
        cmd += ["--job", job]
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in drop} | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise AssertionError(f"{shlex.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return {"root": root, "output": proc.stdout + proc.stderr, **json.loads((root / "result.json").read_text())}


@pytest.mark.parametrize("case", ["vit_demo", "vit_22b_demo", "vit_demo_2d_pre_logits", "mae_vit_demo"])
def test_zero_init_partitions_at_construction_and_keeps_the_init(launched, case):
    got = launched["compare"][case]
    assert got["held_elements"] == 0  # every parameter an empty placeholder outside forward
    assert got["own_fraction"] == pytest.approx(0.5, abs=0.01)  # each rank keeps its half
    assert got["same_keys"] and got["max_abs_diff"] == 0.0  # timm's and MAE's init, bit for bit


def test_vit_22b_twin_trains_exports_resamples_and_resumes_under_zero3(launched):
    root = launched["root"]
    assert "resumed from step00000006 at step 6" in launched["output"]
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    ckpt_meta = json.loads((root / "run" / "checkpoints" / "step00000009" / "meta.json").read_text())
    losses = {m.step: m.value for m in client.get_metric_history(ckpt_meta["run_id"], "loss")}
    assert sorted(losses) == list(range(1, 10))  # one MLflow run across the resume
    assert client.get_run(ckpt_meta["run_id"]).data.params["fused_attn"] == "True"  # timm's SDPA in every block
    assert all(torch.isfinite(torch.tensor(list(losses.values()))))
    state = load_file(root / "run" / "export" / "model.safetensors")
    torch.manual_seed(0)
    fresh = build_model("vit_22b_demo", num_classes=10)
    model = build_model("vit_22b_demo", num_classes=10)
    model.load_state_dict(state, strict=True)
    assert any(not torch.equal(state[k], v) for k, v in fresh.state_dict().items())  # it trained
    images = torch.randn(2, 3, 32, 32)
    assert torch.isfinite(model(images)).all()
    # fine-tuning at 48 px: position embeddings resampled in 2-D
    resized = resize_pos_embed_in_state_dict(state, model_name="vit_22b_demo", old_img_size=32, new_img_size=48, num_classes=10)
    bigger = build_model("vit_22b_demo", num_classes=10, img_size=48)
    bigger.load_state_dict(resized, strict=True)
    assert bigger(torch.randn(2, 3, 48, 48)).shape == (2, 10)
