"""The real `python -m pretrain train` CLI: 2 gloo processes with ZeRO-2 on real Fashion-MNIST shards."""
from __future__ import annotations

import json

import pytest
import timm
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from pretrain.checkpoint.export import load_exported

CONFIG = "configs/pretrain/demo_fmnist.yaml"


def train_args(shards, out, db, *extra):
    return [
        "pretrain", "train", "--config", CONFIG, f"data.train_urls={shards['train']}", f"data.val_urls={shards['val']}",
        f"train.output_dir={out}", f"tracking.tracking_uri=sqlite:///{db}", "tracking.experiment=test-train",
        "optim.decay=constant", "optim.warmup_steps=0", "optim.lr=1e-3", "train.log_every=5", "data.batch_size=32", *extra,
    ]


def loss_history(db, run_id) -> dict[int, float]:
    client = MlflowClient(f"sqlite:///{db}")
    return {m.step: m.value for m in client.get_metric_history(run_id, "loss")}


@pytest.fixture(scope="module")
def runs(fmnist_shards, run_module, tmp_path_factory):
    """An uninterrupted 60-step run, and the same run stopped at step 15 and resumed to 30 (the lr is
    constant, so the first 30 steps of both are the same computation)."""
    root = tmp_path_factory.mktemp("train")
    db = root / "mlflow.db"
    full = root / "full"
    run_module(train_args(fmnist_shards, full, db, "train.steps=60"), nproc=2)
    part = root / "part"
    run_module(train_args(fmnist_shards, part, db, "train.steps=15"), nproc=2)
    resumed = run_module(train_args(fmnist_shards, part, db, "train.steps=30", "train.resume=true"), nproc=2)
    return {"db": db, "full": full, "part": part, "resume_log": resumed.stdout + resumed.stderr}


def run_id_of(out):
    tag = (out / "checkpoints" / "latest").read_text()
    return json.loads((out / "checkpoints" / tag / "meta.json").read_text())["run_id"]


def test_two_process_zero2_lowers_the_loss(runs):
    history = loss_history(runs["db"], run_id_of(runs["full"]))
    assert sorted(history) == list(range(5, 65, 5))
    assert history[60] < 0.8 * history[5] and history[60] < 2.0  # falling, and below chance (ln 10 = 2.30)
    meta = json.loads((runs["full"] / "checkpoints" / "step00000060" / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["config"]["engine"]["zero_stage"] == 2


def test_resume_continues_the_step_and_the_same_loss_curve(runs):
    assert "resumed from step00000015 at step 15" in runs["resume_log"]
    full = loss_history(runs["db"], run_id_of(runs["full"]))
    part = loss_history(runs["db"], run_id_of(runs["part"]))  # the resumed job continues its MLflow run
    assert sorted(part) == [5, 10, 15, 20, 25, 30]
    for step in (20, 25, 30):  # same data order, RNG and optimizer state: the same numbers on CPU
        assert part[step] == pytest.approx(full[step], rel=1e-5), step


def test_checkpoints_keep_the_last_two_and_point_latest_at_the_newest(runs):
    ckpts = runs["part"] / "checkpoints"
    assert (ckpts / "latest").read_text() == "step00000030"
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == ["step00000015", "step00000030"]


def test_export_loads_into_timm_with_the_same_logits(runs):
    path = runs["full"] / "export" / "model.safetensors"
    ours, meta = load_exported(path)
    model = timm.create_model(meta["timm_name"], pretrained=False, **meta["timm_kwargs"])
    model.load_state_dict(load_file(path), strict=True)
    model.eval()
    x = torch.randn(4, 3, 28, 28)
    torch.testing.assert_close(model(x), ours(x))
    assert meta["num_classes"] == 10 and meta["run_id"] == run_id_of(runs["full"])


def test_fewshot_cli_on_digits_is_well_above_chance(runs, run_module):
    db = runs["db"]
    proc = run_module(["pretrain", "fewshot", "--model", str(runs["full"] / "export" / "model.safetensors"),
                       "--dataset", "digits", "--shots", "10", "25", "--tracking-uri", f"sqlite:///{db}",
                       "--experiment", "test-fewshot"])
    assert "25-shot" in proc.stdout
    client = MlflowClient(f"sqlite:///{db}")
    run = client.search_runs([client.get_experiment_by_name("test-fewshot").experiment_id])[0]
    assert run.data.tags["pretrain_run_id"] == run_id_of(runs["full"])
    assert {"fewshot/digits/10shot/seed0", "fewshot/digits/10shot/seed2", "fewshot/digits/25shot/std"} <= set(run.data.metrics)
    assert run.data.metrics["fewshot/digits/25shot"] > 0.2  # chance is 0.1


def test_transfer_cli_fine_tunes_on_digits(runs, run_module):
    db = runs["db"]
    proc = run_module(["pretrain", "transfer", "--config", "configs/transfer/demo_digits.yaml",
                       f"model={runs['full'] / 'export' / 'model.safetensors'}", "lr_grid=[]", "optim.lr=0.03",
                       f"tracking.tracking_uri=sqlite:///{db}", "tracking.experiment=test-transfer"])
    assert "transfer digits: lr=0.03" in proc.stdout
    client = MlflowClient(f"sqlite:///{db}")
    run = client.search_runs([client.get_experiment_by_name("test-transfer").experiment_id])[0]
    assert run.data.metrics["top1"] > 0.3 and run.data.metrics["mean_per_class"] > 0.3  # chance is 0.1
