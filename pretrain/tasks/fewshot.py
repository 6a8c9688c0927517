"""`python -m pretrain fewshot --model SOURCE --dataset digits cifar10=/data/cifar ...`

Also the library entry the trainer calls every N steps: `evaluate_fewshot` (small splits via
`max_train_per_class` / `max_test`) then `log_fewshot(tracker, results, step)`.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import torch.nn as nn

from pretrain.datasets import LabeledImages, dataset_spec, dev_split, load_dataset
from pretrain.evaluation.features import extract_features
from pretrain.evaluation.fewshot_ridge import L2_GRID, FeatureSet, fewshot_table, select_l2
from pretrain.checkpoint.model_source import SOURCE_HELP, local_exported, provenance_tags
from pretrain.tracking.tracker import Tracker, build_tracker, failing_closes, seed_stats
from pretrain.checkpoint.weights import load_exported


@dataclass
class FewshotResults:
    """Test accuracy per data set and shot count (one entry per seed), and the l2 they used."""

    accuracy: dict[str, dict[int, list[float]]]
    l2: float
    l2_dev_accuracy: dict[float, float] = field(default_factory=dict)  # mean dev accuracy per l2 of the grid


def _capped(data: LabeledImages, *, per_class: int | None = None, total: int | None = None) -> LabeledImages:
    """A fixed subset (seed 0), so periodic evaluations during pretraining score the same images."""
    rng = np.random.default_rng(0)
    if per_class is not None:
        idx = np.concatenate([rng.permutation(np.flatnonzero(data.labels == c))[:per_class] for c in np.unique(data.labels)])
        data = data.subset(np.sort(idx))
    if total is not None and len(data) > total:
        data = data.subset(np.sort(rng.permutation(len(data))[:total]))
    return data


def evaluate_fewshot(model: nn.Module, *, datasets: Sequence[str], data_root: str | Mapping[str, str | None] | None,
                     image_size: int, mean, std, shots: Sequence[int], seeds: Sequence[int], l2: float | None = None,
                     l2_grid: Sequence[float] = L2_GRID, max_train_per_class: int | None = None,
                     max_test: int | None = None, batch_size: int = 256) -> FewshotResults:
    """Few-shot accuracy of `model`'s frozen pre-logits on each data set.

    `data_root`: one folder for every data set, or a mapping name -> folder. `l2=None` picks one
    l2 from `l2_grid` for all data sets on their dev splits (see pretrain.evaluation.fewshot_ridge). Under ZeRO-3
    call it on every rank (the forward passes gather weights); results are the same everywhere.
    """
    features = fewshot_features(model, datasets=datasets, data_root=data_root, image_size=image_size, mean=mean, std=std,
                                max_train_per_class=max_train_per_class, max_test=max_test, batch_size=batch_size)
    return score_fewshot(features, shots=shots, seeds=seeds, l2=l2, l2_grid=l2_grid)


def fewshot_features(model: nn.Module, *, datasets: Sequence[str], data_root: str | Mapping[str, str | None] | None,
                     image_size: int, mean, std, max_train_per_class: int | None = None, max_test: int | None = None,
                     batch_size: int = 256) -> dict[str, FeatureSet]:
    """The first step of `evaluate_fewshot`: train and test features of each data set, with its dev split."""
    features = {}
    for name in datasets:
        root = data_root.get(name) if isinstance(data_root, Mapping) else data_root
        train = _capped(load_dataset(name, root, "train"), per_class=max_train_per_class)
        test = _capped(load_dataset(name, root, "test"), total=max_test)
        kw = dict(image_size=image_size, mean=mean, std=std, batch_size=batch_size)
        train_x, train_y = extract_features(model, train, desc=f"{name} train", **kw)
        test_x, test_y = extract_features(model, test, desc=f"{name} test", **kw)
        features[name] = FeatureSet(train_x, train_y, test_x, test_y, train.num_classes,
                                    dev_val=dev_split(train, dataset_spec(name).dev_fraction)[1])
    return features


def score_fewshot(features: Mapping[str, FeatureSet], *, shots: Sequence[int], seeds: Sequence[int], l2: float | None = None,
                  l2_grid: Sequence[float] = L2_GRID) -> FewshotResults:
    """The second step of `evaluate_fewshot`: the l2 (chosen on the dev splits if None), then test accuracy."""
    curve: dict[float, float] = {}
    if l2 is None:
        l2, accs = select_l2(features, shots=shots, seeds=seeds, l2s=l2_grid)
        curve = dict(zip(l2_grid, accs.tolist()))
    accuracy = {
        name: fewshot_table(f.train_x, f.train_y, f.test_x, f.test_y, num_classes=f.num_classes, shots=shots, seeds=seeds, l2=l2)
        for name, f in features.items()
    }
    return FewshotResults(accuracy, l2, curve)


def log_fewshot(tracker: Tracker, results: FewshotResults, step: int | None = None) -> dict[str, float]:
    """Per-seed accuracies and their mean and std as `fewshot/<data>/<k>shot[/seed<i>|/std]`, and the l2."""
    metrics = {"fewshot/l2": results.l2}
    if results.l2_dev_accuracy:
        metrics["fewshot/l2_dev_accuracy"] = results.l2_dev_accuracy[results.l2]
    for name, table in results.accuracy.items():
        for shots, accs in table.items():
            metrics.update(seed_stats(f"fewshot/{name}/{shots}shot", accs))
    tracker.log_metrics(metrics, step=step)
    return metrics


def parse_datasets(items: Sequence[str], default_root: str | None) -> dict[str, str | None]:
    """`["digits", "cifar10=/data/cifar"]` -> {"digits": default_root, "cifar10": "/data/cifar"}."""
    roots = {}
    for item in items:
        name, sep, root = item.partition("=")
        dataset_spec(name)  # unknown names fail here, listing the known ones
        roots[name] = root if sep else default_root
    return roots


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help=SOURCE_HELP)
    parser.add_argument("--dataset", nargs="+", default=["digits"], help="data set names, or name=root")
    parser.add_argument("--data-root", default=None, help="folder of the data sets' official files (for names without =root)")
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 5, 10, 25])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--l2", type=float, default=None,
                        help="fixed ridge l2; default: one l2 of 2^-10..2^19 chosen across the data sets on their dev splits")
    parser.add_argument("--max-train-per-class", type=int, default=None, help="cap train images per class")
    parser.add_argument("--max-test", type=int, default=None, help="cap test images")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    parser.add_argument("--experiment", default="vitscale")
    parser.add_argument("--run-name", default=None)
    parser.add_argument("--parent-run-id", default=None)


def main(args: argparse.Namespace) -> int:
    roots = parse_datasets(args.dataset, args.data_root)
    with local_exported(args.model, tracking_uri=args.tracking_uri) as path:
        model, meta = load_exported(path)
    tracker = build_tracker(
        is_main=True, tracking_uri=args.tracking_uri, experiment=args.experiment,
        run_name=args.run_name or f"fewshot-{'-'.join(roots)}", parent_run_id=args.parent_run_id,
        tags={"stage": "fewshot", "datasets": ",".join(roots), **provenance_tags(meta, args.model)},
    )
    tracker.log_params({"model": args.model, "datasets": ",".join(roots), "shots": args.shots, "seeds": args.seeds,
                        "l2": "grid 2^-10..2^19" if args.l2 is None else args.l2, "image_size": meta["image_size"],
                        "max_train_per_class": args.max_train_per_class, "max_test": args.max_test})
    with failing_closes(tracker):
        results = evaluate_fewshot(model, datasets=list(roots), data_root=roots, image_size=meta["image_size"], mean=meta["mean"],
                                   std=meta["std"], shots=args.shots, seeds=args.seeds, l2=args.l2,
                                   max_train_per_class=args.max_train_per_class, max_test=args.max_test, batch_size=args.batch_size)
    metrics = log_fewshot(tracker, results)
    tracker.close()
    print(f"l2 = 2^{np.log2(results.l2):g}" + (" (chosen on the dev splits)" if args.l2 is None else ""))
    for name, table in results.accuracy.items():
        for shots in table:
            key = f"fewshot/{name}/{shots}shot"
            print(f"{name:12s} {shots:3d}-shot  {100 * metrics[key]:5.1f} ± {100 * metrics[key + '/std']:.1f} %")
    return 0
