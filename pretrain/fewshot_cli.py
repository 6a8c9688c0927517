"""`python -m pretrain fewshot --model export/model.safetensors --dataset digits ...`"""
from __future__ import annotations

import argparse

import numpy as np
import torch.nn as nn

from pretrain.datasets import load_dataset
from pretrain.export import load_exported
from pretrain.features import extract_features
from pretrain.fewshot import DEFAULT_L2, fewshot_table
from pretrain.tracking import Tracker, build_tracker


def evaluate_fewshot(model: nn.Module, *, datasets: list[str], data_root: str | None, image_size: int, mean, std,
                     shots: list[int], seeds: list[int], l2: float) -> dict[str, dict[int, list[float]]]:
    results = {}
    for name in datasets:
        train = load_dataset(name, data_root, "train")
        test = load_dataset(name, data_root, "test")
        kw = dict(image_size=image_size, mean=mean, std=std)
        train_x, train_y = extract_features(model, train, desc=f"{name} train", **kw)
        test_x, test_y = extract_features(model, test, desc=f"{name} test", **kw)
        results[name] = fewshot_table(train_x, train_y, test_x, test_y, num_classes=train.num_classes, shots=shots, seeds=seeds, l2=l2)
    return results


def log_fewshot(tracker: Tracker, results: dict[str, dict[int, list[float]]], step: int | None = None) -> dict[str, float]:
    """Per-seed accuracies and their mean and std, as `fewshot/<data>/<k>shot[...]`."""
    metrics = {}
    for name, table in results.items():
        for shots, accs in table.items():
            key = f"fewshot/{name}/{shots}shot"
            metrics.update({f"{key}/seed{i}": a for i, a in enumerate(accs)})
            metrics[key] = float(np.mean(accs))
            metrics[f"{key}/std"] = float(np.std(accs))
    tracker.log_metrics(metrics, step=step)
    return metrics


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="exported .safetensors (with its .json sidecar)")
    parser.add_argument("--dataset", nargs="+", default=["digits"])
    parser.add_argument("--data-root", default=None, help="folder holding the data set's official files")
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 5, 10, 25])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--l2", type=float, default=DEFAULT_L2)
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    parser.add_argument("--experiment", default="vitscale")
    parser.add_argument("--parent-run-id", default=None)


def main(args: argparse.Namespace) -> int:
    model, meta = load_exported(args.model)
    tracker = build_tracker(
        is_main=True, tracking_uri=args.tracking_uri, experiment=args.experiment, run_name="fewshot",
        parent_run_id=args.parent_run_id, tags={"stage": "fewshot", "pretrain_run_id": str(meta.get("run_id"))},
    )
    tracker.log_params({"model": args.model, "datasets": ",".join(args.dataset), "shots": args.shots, "seeds": args.seeds, "l2": args.l2})
    results = evaluate_fewshot(model, datasets=args.dataset, data_root=args.data_root, image_size=meta["image_size"],
                               mean=meta["mean"], std=meta["std"], shots=args.shots, seeds=args.seeds, l2=args.l2)
    metrics = log_fewshot(tracker, results)
    tracker.close()
    for name, table in results.items():
        for shots in table:
            key = f"fewshot/{name}/{shots}shot"
            print(f"{name:12s} {shots:3d}-shot  {100 * metrics[key]:5.1f} ± {100 * metrics[key + '/std']:.1f} %")
    return 0
