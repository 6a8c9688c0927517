"""A short MAE run of the real `python -m pretrain train` CLI on unlabelled Fashion-MNIST shards."""
from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from pretrain.checkpoint.export import load_exported
from pretrain.evaluation.fewshot_ridge import DEFAULT_L2
from pretrain.tasks.fewshot import evaluate_fewshot
from pretrain.models import build_model

CONFIG = "configs/pretrain/demo_mae.yaml"
STEPS = 200


@pytest.fixture(scope="module")
def run(fmnist_shards, run_module, tmp_path_factory):
    root = tmp_path_factory.mktemp("mae")
    db = root / "mlflow.db"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("OMP_NUM_THREADS", "1")  # a tiny model: one thread is as fast, and kinder to a shared machine
        run_module([
            "pretrain", "train", "--config", CONFIG, f"data.train_urls={fmnist_shards['train']}",
            f"data.val_urls={fmnist_shards['val']}", f"train.output_dir={root / 'run'}", f"tracking.tracking_uri=sqlite:///{db}",
            "tracking.experiment=test-ssl", f"train.steps={STEPS}", "train.ckpt_every=0", f"train.visualize_every={STEPS}",
        ])
    out = root / "run"
    tag = (out / "checkpoints" / "latest").read_text()
    run_id = json.loads((out / "checkpoints" / tag / "meta.json").read_text())["run_id"]
    return {"out": out, "client": MlflowClient(f"sqlite:///{db}"), "run_id": run_id}


def test_the_reconstruction_loss_falls(run):
    history = {m.step: m.value for m in run["client"].get_metric_history(run["run_id"], "loss")}
    assert sorted(history) == list(range(10, STEPS + 1, 10))
    first, last = np.mean([history[s] for s in (10, 20)]), np.mean([history[s] for s in (STEPS - 10, STEPS)])
    assert last < 0.9 * first, history


def test_the_export_is_the_encoder_alone_and_loads_into_timm(run):
    path = run["out"] / "export" / "model.safetensors"
    ours, meta = load_exported(path)
    model = timm.create_model(meta["timm_name"], pretrained=False, **meta["timm_kwargs"])
    model.load_state_dict(load_file(path), strict=True)  # no decoder, mask token or draw counter
    x = torch.randn(2, 3, 28, 28)
    torch.testing.assert_close(model.eval()(x), ours(x))


def test_reconstructions_are_drawn_and_logged(run):
    assert (run["out"] / "visualize" / f"step{STEPS:08d}.png").is_file()
    logged = [a.path for a in run["client"].list_artifacts(run["run_id"], "visualize")]
    assert logged == [f"visualize/step{STEPS:08d}.png"]


def test_few_shot_accuracy_beats_random_initialisation(run):
    """Ridge few-shot on digits at big_vision's l2 of 2^10.

    With an l2 chosen on the dev split, random ViT features of these 8x8 digits (close to the
    pixels) score as well as any short Fashion-MNIST pretraining, supervised included.
    """
    trained, meta = load_exported(run["out"] / "export" / "model.safetensors")
    torch.manual_seed(0)
    random_init = build_model(meta["model"], num_classes=meta["num_classes"], **meta["model_kwargs"])
    kw = dict(datasets=["digits"], data_root=None, image_size=28, mean=meta["mean"], std=meta["std"],
              shots=[5, 10], seeds=[0, 1, 2], l2=DEFAULT_L2, max_train_per_class=40, max_test=300)
    scores = {name: np.mean([acc for accs in evaluate_fewshot(model.eval(), **kw).accuracy["digits"].values() for acc in accs])
              for name, model in (("mae", trained), ("random", random_init))}
    assert scores["mae"] > scores["random"] + 0.03, scores
