"""Few-shot evaluation of a model over several data sets: features once, one l2, tracked in MLflow."""
from __future__ import annotations

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from pretrain.__main__ import main as cli
from pretrain.checkpoint.export import load_exported
from pretrain.evaluation.fewshot_ridge import L2_GRID
from pretrain.tasks.fewshot import evaluate_fewshot, log_fewshot
from pretrain.tracking.tracker import MLflowTracker


def test_features_once_per_data_set_one_l2_for_all(official, tiny_export, tracking_uri):
    model, meta = load_exported(tiny_export)
    seen = []
    model.patch_embed.register_forward_hook(lambda m, inp, out: seen.append(len(inp[0])))
    roots = {"cifar10": str(official["cifar10"]["archive"]), "digits": None}
    results = evaluate_fewshot(model, datasets=list(roots), data_root=roots, image_size=28, mean=meta["mean"], std=meta["std"],
                               shots=[1, 5], seeds=[0, 1, 2], max_train_per_class=20, max_test=50)
    # every image went through the model once, whatever the shots, seeds and 30 l2 values
    assert sum(seen) == (50 + 20) + (10 * 20 + 50)
    assert results.l2 in L2_GRID and list(results.l2_dev_accuracy) == list(L2_GRID)
    assert results.l2_dev_accuracy[results.l2] == max(results.l2_dev_accuracy.values())
    assert set(results.accuracy) == {"cifar10", "digits"} and all(len(a) == 3 for t in results.accuracy.values() for a in t.values())

    tracker = MLflowTracker(tracking_uri=tracking_uri, experiment="fs", run_name="fs", system_metrics=False)
    metrics = log_fewshot(tracker, results, step=100)
    tracker.close()
    logged = MlflowClient(tracker.tracking_uri).get_run(tracker.run_id).data.metrics
    accs = results.accuracy["digits"][5]
    assert logged["fewshot/digits/5shot/seed2"] == pytest.approx(accs[2])
    assert logged["fewshot/digits/5shot"] == pytest.approx(np.mean(accs)) and logged["fewshot/digits/5shot/std"] == pytest.approx(np.std(accs))
    assert logged["fewshot/l2"] == results.l2 and metrics.keys() == logged.keys()


def test_fewshot_cli_tags_the_pretraining_run_and_accepts_roots_per_data_set(official, tiny_export, tracking_uri, capsys):
    pets = official["pets"]["folder"]
    assert cli(["fewshot", "--model", str(tiny_export), "--dataset", f"pets={pets}", "imagefolder",
                "--data-root", str(official["imagefolder"]["archive"]), "--shots", "1", "2", "--l2", "1024",
                "--tracking-uri", tracking_uri, "--experiment", "fs-cli"]) == 0
    out = capsys.readouterr().out
    assert "l2 = 2^10\n" in out and "pets           2-shot" in out and "imagefolder    1-shot" in out
    client = MlflowClient(tracking_uri)
    run = client.search_runs([client.get_experiment_by_name("fs-cli").experiment_id])[0]
    assert run.data.tags["pretrain_run_id"] == "pretrain-run" and run.data.tags["pretrain_step"] == "7"
    assert run.data.tags["stage"] == "fewshot" and run.data.tags["datasets"] == "pets,imagefolder"
    assert run.data.params["l2"] == "1024.0" and run.data.metrics["fewshot/l2"] == 1024
    assert {"fewshot/pets/2shot/seed0", "fewshot/pets/2shot/seed2", "fewshot/imagefolder/1shot/std"} <= set(run.data.metrics)


def test_unknown_data_set_fails_before_any_work(tiny_export):
    with pytest.raises(KeyError, match="unknown data set 'petz'"):
        cli(["fewshot", "--model", str(tiny_export), "--dataset", "petz", "--tracking-uri", "sqlite:////nonexistent/x.db"])
