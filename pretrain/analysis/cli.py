"""`python -m pretrain analyze`: attention distance, CKA and attention rollout of an exported model.

Writes PNGs and `analysis.json` to --out and logs them (and summary metrics) to an MLflow run.
"""
from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import numpy as np
import torch

from pretrain.analysis.cka import ESTIMATORS
from pretrain.analysis.plots import plot_attention_distance, plot_cka, plot_rollout
from pretrain.analysis.run import MIN_CKA_BATCH, Analysis, Subject, analyze, batched, iter_shard_images
from pretrain.config import TrackingConfig
from pretrain.checkpoint.model_source import SOURCE_HELP, local_exported
from pretrain.tracking.tracker import build_tracker, failing_closes

TIMM_PREFIX = "timm:"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help=SOURCE_HELP)
    parser.add_argument("--data", required=True, help="shard URL pattern, e.g. 'dir/val-{000000..000001}.tar'")
    parser.add_argument("--compare", default=None,
                        help="second model for cross-model CKA: an exported .safetensors, or timm:NAME "
                             "(timm architecture with random weights, fed images at --model's size, e.g. timm:resnet50)")
    parser.add_argument("--num-images", type=int, default=256, help="images read from the start of the shards")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rollout-images", type=int, default=8, help="images in the attention rollout figure")
    parser.add_argument("--cka-estimator", choices=sorted(ESTIMATORS), default="minibatch",
                        help="minibatch: unbiased HSIC per batch, constant memory; full: all features held at once")
    parser.add_argument("--out", default=None, help="output folder (default: runs/analysis/<model file stem>)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tracking-uri", default=TrackingConfig().tracking_uri)
    parser.add_argument("--experiment", default=TrackingConfig().experiment)
    parser.add_argument("--run-name", default=None)
    parser.add_argument("--no-tracking", action="store_true", help="write the files only, log nothing to MLflow")


def load_subject(spec: str, *, image_size: int | None, device: str, tracking_uri: str | None = None) -> Subject:
    """An exported model, or `timm:NAME` built with random weights at `image_size`."""
    if spec.startswith(TIMM_PREFIX):
        import timm

        name = spec.removeprefix(TIMM_PREFIX)
        if not timm.is_model(name):
            raise ValueError(f"--compare {spec}: timm has no model {name!r}; see timm.list_models()")
        model = timm.create_model(name, pretrained=False, num_classes=0)
        cfg = model.pretrained_cfg
        return Subject(name, model, image_size or cfg["input_size"][-1], tuple(cfg["mean"]), tuple(cfg["std"]))
    from pretrain.checkpoint.weights import load_exported

    with local_exported(spec, tracking_uri=tracking_uri) as path:  # a file, s3://, runs:/, models:/
        model, meta = load_exported(path, device=device)
    return Subject(meta["model"], model, int(meta["image_size"]), tuple(meta["mean"]), tuple(meta["std"]))


def summary_metrics(result: Analysis) -> dict[str, list[float]]:
    """Per-layer series (MLflow step = layer number, from 1) for the run's charts."""
    series: dict[str, list[float]] = {"attention_distance/mean": [float(np.mean(h)) for h in result.attention_distance]}
    for head in range(max(len(h) for h in result.attention_distance)):
        series[f"attention_distance/head_{head}"] = [h[head] for h in result.attention_distance if head < len(h)]
    series["cka/next_layer"] = [float(result.cka[i, i + 1]) for i in range(len(result.layers) - 1)]
    if result.cka_cross is not None:
        series["cka_cross/best_match"] = result.cka_cross.max(1).tolist()
    return series


def write_outputs(result: Analysis, out: Path, *, name: str, reference: str | None, cka_estimator: str) -> list[Path]:
    """PNGs and analysis.json (written to a temp name, then renamed)."""
    files = [
        plot_attention_distance(result.attention_distance, out / "attention_distance.png", title=name),
        plot_cka(result.cka, out / f"cka_{name}.png", xlabel=f"{name} layer", ylabel=f"{name} layer", title=f"linear CKA, {name}"),
    ]
    if result.cka_cross is not None:
        files.append(plot_cka(result.cka_cross, out / f"cka_{name}_vs_{reference}.png", xlabel=f"{reference} layer",
                              ylabel=f"{name} layer", title=f"linear CKA, {name} vs {reference}"))
    if result.rollout_maps is not None:
        files.append(plot_rollout(result.rollout_images, result.rollout_maps, out / "attention_rollout.png",
                                  title=f"attention rollout, {name}"))
    report = {
        "model": name,
        "num_images": result.num_images,
        "cka_estimator": cka_estimator,
        "attention_distance": {"layers": result.attention_layers, "pixels": result.attention_distance},
        "cka": {"layers": result.layers, "matrix": result.cka.tolist()},
    }
    if result.cka_cross is not None:
        report["cka_cross"] = {"reference": reference, "layers": result.layers,
                               "reference_layers": result.reference_layers, "matrix": result.cka_cross.tolist()}
    path = out / "analysis.json"
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, path)
    return files + [path]


def main(args: argparse.Namespace) -> int:
    if args.num_images < MIN_CKA_BATCH or args.batch_size < MIN_CKA_BATCH:
        raise ValueError(f"--num-images and --batch-size must be at least {MIN_CKA_BATCH} (the unbiased CKA estimator needs 4 images per batch)")
    if not 0 <= args.rollout_images <= args.num_images:
        raise ValueError(f"--rollout-images must be between 0 and --num-images ({args.num_images})")
    subject = load_subject(args.model, image_size=None, device=args.device, tracking_uri=args.tracking_uri)
    reference = load_subject(args.compare, image_size=subject.image_size, device=args.device,
                             tracking_uri=args.tracking_uri) if args.compare else None
    out = Path(args.out or Path("runs/analysis") / Path(args.model).stem)

    result = analyze(
        subject, batched(iter_shard_images(args.data, args.num_images), args.batch_size),
        reference=reference, cka_estimator=args.cka_estimator, rollout_images=args.rollout_images,
        device=args.device, total_batches=math.ceil(args.num_images / args.batch_size),
    )
    files = write_outputs(result, out, name=subject.name, reference=reference.name if reference else None,
                          cka_estimator=args.cka_estimator)

    tracker = build_tracker(is_main=not args.no_tracking, tracking_uri=args.tracking_uri, experiment=args.experiment,
                            run_name=args.run_name or f"analyze-{Path(args.model).stem}", tags={"command": "analyze"})
    with failing_closes(tracker):
        tracker.log_params({"model": args.model, "data": args.data, "compare": args.compare, "num_images": result.num_images,
                            "batch_size": args.batch_size, "cka_estimator": args.cka_estimator})
        series = summary_metrics(result)
        for layer in range(1, max(map(len, series.values())) + 1):
            tracker.log_metrics({k: v[layer - 1] for k, v in series.items() if layer <= len(v)}, step=layer)
        for path in files:
            tracker.log_artifact(path, "analysis")
    tracker.close()
    print(f"analysis of {result.num_images} images in {out}" + (f"; MLflow run {tracker.run_id}" if tracker.run_id else ""))
    return 0
