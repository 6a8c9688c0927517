"""The paper's fine-tuning recipes, and `python -m pretrain transfer` on 2 ranks with ZeRO-2 from an MLflow run.

(The real-data fine-tune on digits after Fashion-MNIST pretraining is in tests/pretrain/tasks/test_pretrain.py.)
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from pretrain.config import ConfigError, TransferConfig, load_config
from pretrain.datasets import dataset_spec

from .conftest import export_tiny_model

PAPER = {"cifar10": 10_000, "cifar100": 10_000, "pets": 500, "flowers102": 500}


@pytest.mark.parametrize("name, steps", PAPER.items())
def test_paper_recipes_validate_with_appendix_b11_values(name, steps):
    cfg = load_config(TransferConfig, f"configs/transfer/{name}.yaml")
    assert cfg.data.name == name and cfg.steps == steps and cfg.data.image_size == 384
    assert cfg.engine.global_batch == 512 and cfg.engine.grad_clip == 1.0
    assert (cfg.optim.name, cfg.optim.momentum, cfg.optim.weight_decay, cfg.optim.decay) == ("sgd", 0.9, 0.0, "cosine")
    assert 0 < cfg.optim.warmup_steps < steps
    assert cfg.lr_grid == [0.001, 0.003, 0.01, 0.03] and len(cfg.seeds) == 3
    assert cfg.data.dev_fraction is None and dataset_spec(name).dev_fraction == (0.02 if "cifar" in name else 0.1)


def test_demo_recipe_and_bad_overrides():
    assert load_config(TransferConfig, "configs/transfer/demo_digits.yaml").data.name == "digits"
    with pytest.raises(ConfigError, match=r"lr_grid.1: Input should be greater than 0"):
        load_config(TransferConfig, "configs/transfer/cifar10.yaml", ["lr_grid=[0.1,0]"])
    with pytest.raises(ConfigError, match=r"seeds: List should have at least 1 item"):
        load_config(TransferConfig, "configs/transfer/pets.yaml", ["seeds=[]"])


def test_two_ranks_zero2_choose_the_lr_on_dev_then_fine_tune_every_seed(official, tracking_uri, tmp_path, run_module):
    """(Sources other than a local file: test_model_source.py.)"""
    export = export_tiny_model(tmp_path / "export" / "model.safetensors", run_id="0123456789abcdef", step=30)
    out = tmp_path / "transfer"
    proc = run_module([
        "pretrain", "transfer", "--config", "configs/transfer/cifar10.yaml", f"model={export}",
        f"data.root={official['cifar10']['archive']}", "data.image_size=32", "data.batch_size=4", "data.num_workers=0",
        "engine.global_batch=16", "engine.zero_stage=2", "steps=2", "optim.warmup_steps=1", "lr_grid=[0.001,0.03]",
        "seeds=[0,1]", f"output_dir={out}", f"tracking.tracking_uri={tracking_uri}", "tracking.experiment=t-transfer",
    ], nproc=2)
    assert "dev top-1 per lr: 0.001: " in proc.stdout and "(2 seeds)" in proc.stdout

    client = MlflowClient(tracking_uri)
    run = client.search_runs([client.get_experiment_by_name("t-transfer").experiment_id])[0]
    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    assert (tags["stage"], tags["dataset"], tags["pretrain_run_id"], tags["pretrain_step"]) == ("transfer", "cifar10", "0123456789abcdef", "30")
    assert params["world_size"] == "2" and float(params["chosen_lr"]) in (0.001, 0.03) and params["train_images"] == "50"
    assert {"dev/lr_0.001/top1", "dev/lr_0.03/top1", "test/seed0/loss", "test/seed1/mean_per_class"} <= set(metrics)
    seeds = [metrics["top1/seed0"], metrics["top1/seed1"]]
    assert metrics["top1"] == pytest.approx(np.mean(seeds)) and metrics["top1/std"] == pytest.approx(np.std(seeds))
    for acc in seeds:  # counts of both ranks' halves of the 20 test images were summed
        assert abs(acc * 20 - round(acc * 20)) < 1e-6
    results = json.loads((out / "cifar10" / "results.json").read_text())
    assert results["top1"] == pytest.approx(metrics["top1"]) and results["lr"] == float(params["chosen_lr"])
