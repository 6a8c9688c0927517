"""`python -m pretrain demo`: the whole path on CPU, tracked in one MLflow parent run.

Fashion-MNIST -> WebDataset shards -> tiny ViT pretrained with DeepSpeed ZeRO-2 on 2
processes -> exported safetensors -> few-shot ridge evaluation and a short fine-tune on
scikit-learn's digits -> a table of results. Each stage is the same CLI a user runs.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from data_pipeline import sources
from data_pipeline.writer import read_info, write_split
from pretrain.fewshot_cli import evaluate_fewshot, log_fewshot
from pretrain.weights import load_exported
from pretrain.tracking import MLflowTracker, ui_url

PRETRAIN_CONFIG = "configs/pretrain/demo_fmnist.yaml"
TRANSFER_CONFIG = "configs/transfer/demo_digits.yaml"
SPLITS = {"train": 20_000, "test": 2_000}
SAMPLES_PER_SHARD = 1_000


def write_shards(fmnist_root: str, out: Path) -> None:
    """Fashion-MNIST shards, unless a complete set is already there."""
    try:
        have = {name: split["num_samples"] for name, split in read_info(out)["splits"].items()}
    except FileNotFoundError:
        have = {}
    for split, n in SPLITS.items():
        if have.get(split) != n:
            write_split(sources.fashion_mnist(fmnist_root, split, limit=n), out, prefix=split, split=split,
                        samples_per_shard=SAMPLES_PER_SHARD, class_names=sources.FASHION_MNIST_CLASSES, total=n)


def _run_stage(argv: list[str]) -> None:
    print(f"\n$ {' '.join(argv)}", flush=True)
    subprocess.run([sys.executable, *argv], check=True)  # argv list: no shell involved


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fmnist-root", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--out", default="demo_out", help="shards, checkpoints and exports go here")
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    parser.add_argument("--nproc", type=int, default=2, help="pretraining processes")


def main(args: argparse.Namespace) -> int:
    start = time.time()
    out = Path(args.out)
    shards = out / "shards" / "fmnist"
    write_shards(args.fmnist_root, shards)

    parent = MLflowTracker(tracking_uri=args.tracking_uri, experiment="vitscale-demo", run_name="demo", tags={"stage": "demo"})
    common = [f"tracking.tracking_uri={args.tracking_uri}", f"tracking.parent_run_id={parent.run_id}"]
    pretrain_dir = out / "pretrain"
    _run_stage([
        "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}", "-m", "pretrain", "train",
        "--config", PRETRAIN_CONFIG, f"data.train_urls={shards}/train-{{000000..000019}}.tar",
        f"data.val_urls={shards}/test-{{000000..000001}}.tar", f"train.output_dir={pretrain_dir}", *common,
    ])
    exported = pretrain_dir / "export" / "model.safetensors"

    print("\n$ few-shot on digits (python -m pretrain fewshot)", flush=True)
    model, meta = load_exported(exported)
    fewshot = MLflowTracker(tracking_uri=args.tracking_uri, experiment="vitscale-demo", run_name="fewshot-digits",
                            parent_run_id=parent.run_id, tags={"stage": "fewshot", "pretrain_run_id": str(meta["run_id"])})
    results = evaluate_fewshot(model, datasets=["digits"], data_root=None, image_size=meta["image_size"],
                               mean=meta["mean"], std=meta["std"], shots=[1, 5, 10, 25], seeds=[0, 1, 2], l2=2.0**10)
    fewshot_metrics = log_fewshot(fewshot, results)
    fewshot.close()

    _run_stage(["-m", "pretrain", "transfer", "--config", TRANSFER_CONFIG, f"model={exported}",
                f"output_dir={out / 'transfer'}", *common])

    client = parent.client
    children = client.search_runs([client.get_run(parent.run_id).info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.run_id}'")
    by_stage = {r.data.tags.get("stage"): r.data.metrics for r in children}
    pre, tr = by_stage.get("pretrain", {}), by_stage.get("transfer", {})
    wall = time.time() - start
    rows = [
        ("pretrain  Fashion-MNIST val top-1", pre.get("val_accuracy")),
        *[(f"few-shot  digits {k}-shot (3 seeds)", fewshot_metrics[f"fewshot/digits/{k}shot"]) for k in (1, 5, 10, 25)],
        ("fine-tune digits test top-1", tr.get("top1")),
        ("fine-tune digits mean per-class", tr.get("mean_per_class")),
    ]
    parent.log_metrics({"wall_time_s": wall})
    table = "\n".join(f"  {name:36s} {100 * v:6.2f} %" if v is not None else f"  {name:36s}    n/a" for name, v in rows)
    (out / "results.json").write_text(json.dumps({name: v for name, v in rows} | {"wall_time_s": wall}, indent=1))
    parent.log_artifact(out / "results.json")
    parent.close()
    print(f"\nvitscale demo results (wall time {wall / 60:.1f} min)\n{table}\n")
    print("Browse the runs (parent run 'demo' in experiment 'vitscale-demo'):")
    print(f"  .venv/bin/mlflow ui --backend-store-uri {args.tracking_uri} --port 5000")
    runs_page = ui_url("http://127.0.0.1:5000", f"experiments/{parent.client.get_run(parent.run_id).info.experiment_id}/runs")
    print(f"  then open {runs_page} (MLflow's model-training view; exports under Model registry)")
    return 0
