"""`python -m pretrain demo`: what the ViT paper claims, at CPU scale, with its baselines in one table.

Fashion-MNIST -> WebDataset shards -> a tiny ViT pretrained with DeepSpeed ZeRO-2 on 2 processes
-> exported safetensors -> few-shot ridge evaluation and fine-tuning on scikit-learn's digits.
Beside each pretrained row stands its baseline: logistic regression on the raw pixels, and the
random-init twin (`python -m pretrain twin`: same architecture and sidecar, fresh weights) put
through the same few-shot command and the same fine-tuning recipe and steps. Every row names
the command that reproduces it; the table and the commands go to `<out>/results.json` and the
parent MLflow run.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from data_pipeline import sources
from data_pipeline.storage import write_atomic
from data_pipeline.writer import read_info, write_split
from pretrain.tracking.tracker import MLflowTracker, ui_url

PRETRAIN_CONFIG = "configs/pretrain/demo_hybrid.yaml"
TRANSFER_CONFIG = "configs/transfer/demo_hybrid_digits.yaml"
SPLITS = {"train": 60_000, "test": 2_000}  # all of Fashion-MNIST's train; the first 2,000 test images validate
SAMPLES_PER_SHARD = 5_000
SHOTS = (1, 5, 10, 25)


@dataclass
class Row:
    name: str
    value: float | None
    command: str


def write_shards(fmnist_root: str, out: Path, splits: dict[str, int] = SPLITS,
                 samples_per_shard: int = SAMPLES_PER_SHARD) -> None:
    """The first `splits[name]` images of each Fashion-MNIST split as shards, unless a complete set is there."""
    try:
        have = {name: split["num_samples"] for name, split in read_info(out)["splits"].items()}
    except FileNotFoundError:
        have = {}
    for split, n in splits.items():
        if have.get(split) != n:
            write_split(sources.fashion_mnist(fmnist_root, split, limit=n), out, prefix=split, split=split,
                        samples_per_shard=samples_per_shard, class_names=sources.FASHION_MNIST_CLASSES, total=n)


def _pixels(dataset: str, fmnist_root: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Raw pixels in [0, 1] (train x, y, test x, y) of the images the ViT rows see."""
    if dataset == "digits":
        from pretrain.datasets import load_dataset

        train, test = load_dataset("digits", None, "train"), load_dataset("digits", None, "test")
        return train.images.reshape(len(train), -1) / 255, train.labels, test.images.reshape(len(test), -1) / 255, test.labels
    arrays = {}
    for split, n in SPLITS.items():
        source = sources.FashionMnistSource(fmnist_root, split)
        arrays[split] = (source.images[:n].reshape(n, -1) / 255, np.asarray(source.labels[:n]))
    return (*arrays["train"], *arrays["test"])


def pixel_logreg(dataset: str, fmnist_root: str) -> float:
    """Test top-1 of multinomial logistic regression on standardised raw pixels (scikit-learn, lbfgs)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    train_x, train_y, test_x, test_y = _pixels(dataset, fmnist_root)
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1 if dataset == "fmnist" else 1.0, max_iter=300))
    return float((clf.fit(train_x, train_y).predict(test_x) == test_y).mean())


def _command(argv: list[str]) -> str:
    return shlex.join(["python", *argv])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fmnist-root", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--out", default="demo_out", help="shards, checkpoints and exports go here")
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    parser.add_argument("--nproc", type=int, default=2, help="pretraining processes")
    parser.add_argument("--row", choices=["pixels-fmnist", "pixels-digits"], default=None,
                        help="compute only this baseline row and print it")


def export_metrics(parent: MLflowTracker, exported: Path) -> dict[str, float]:
    """The metrics of the pretraining run that wrote `exported` (its sidecar names the run)."""
    run_id = json.loads(exported.with_suffix(".json").read_text()).get("run_id")
    return parent.client.get_run(run_id).data.metrics if run_id else {}


def child_metrics(parent: MLflowTracker) -> dict[str, dict[str, float]]:
    """Each child run's metrics by run name."""
    client = parent.client
    children = client.search_runs([client.get_run(parent.run_id).info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.run_id}'")
    return {r.info.run_name: r.data.metrics for r in children}


def transfer_top1(folder: Path) -> float | None:
    path = folder / "digits" / "results.json"
    return json.loads(path.read_text())["top1"] if path.is_file() else None


def pretrain_argv(*, shards: Path, train_urls: str, output_dir: Path, nproc: int, uri: str, run_name: str,
                  overrides: tuple[str, ...] = ()) -> list[str]:
    return ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "pretrain", "train",
            "--config", PRETRAIN_CONFIG, f"data.train_urls={shards}/{train_urls}", f"data.val_urls={shards}/test-{{000000..000000}}.tar",
            f"train.output_dir={output_dir}", f"tracking.tracking_uri={uri}", f"tracking.run_name={run_name}", *overrides]


def fewshot_argv(model: Path, *, uri: str, run_name: str) -> list[str]:
    return ["-m", "pretrain", "fewshot", "--model", str(model), "--dataset", "digits", "--tracking-uri", uri,
            "--experiment", "vitscale-demo", "--run-name", run_name]


def transfer_argv(model: Path, *, output_dir: Path, uri: str, run_name: str) -> list[str]:
    return ["-m", "pretrain", "transfer", "--config", TRANSFER_CONFIG, f"model={model}", f"output_dir={output_dir}",
            f"tracking.tracking_uri={uri}", f"tracking.run_name={run_name}"]


def run_stage(argv: list[str], parent_id: str | None) -> None:
    """Run `argv` (shown as it is: the row's command) linked to the parent run `parent_id`."""
    link = [] if parent_id is None or argv[2] == "twin" else (
        ["--parent-run-id", parent_id] if argv[2] == "fewshot" else [f"tracking.parent_run_id={parent_id}"])
    print(f"\n$ {_command(argv)}", flush=True)
    subprocess.run([sys.executable, *argv, *link], check=True)  # argv list: no shell involved


def run_stages(args: argparse.Namespace, out: Path, shards: Path, parent_id: str) -> dict[str, list[str]]:
    """Every stage as the user would type it; the commands by row key."""
    uri = args.tracking_uri
    exported, twin = out / "pretrain" / "export" / "model.safetensors", out / "twin" / "model.safetensors"
    commands = {
        "pretrain": pretrain_argv(shards=shards, train_urls=f"train-{{000000..{SPLITS['train'] // SAMPLES_PER_SHARD - 1:06d}}}.tar",
                                  output_dir=out / "pretrain", nproc=args.nproc, uri=uri, run_name="pretrain-fmnist"),
        "twin": ["-m", "pretrain", "twin", "--model", str(exported), "--out", str(twin)],
    }
    for name, model in (("pretrained", exported), ("twin", twin)):
        commands[f"fewshot-{name}"] = fewshot_argv(model, uri=uri, run_name=f"fewshot-{name}")
        commands[f"transfer-{name}"] = transfer_argv(model, output_dir=out / f"transfer-{name}", uri=uri, run_name=f"transfer-{name}")
    done = {"pretrain": exported, "transfer-pretrained": out / "transfer-pretrained" / "digits" / "results.json",
            "transfer-twin": out / "transfer-twin" / "digits" / "results.json"}
    for key, argv in commands.items():
        if key in done and done[key].is_file():
            print(f"\n$ {_command(argv)}\n  (done before: {done[key]} is there; delete it to run this stage again)", flush=True)
            continue
        run_stage(argv, parent_id)
    return commands


def table_rows(args: argparse.Namespace, out: Path, commands: dict[str, list[str]], runs: dict[str, dict[str, float]],
               pixels: dict[str, float]) -> list[Row]:
    demo_row = lambda name: f"python -m pretrain demo --row {name} --fmnist-root {args.fmnist_root}"  # noqa: E731
    rows = [
        Row("Fashion-MNIST val top-1   logistic regression on pixels", pixels["pixels-fmnist"], demo_row("pixels-fmnist")),
        Row("Fashion-MNIST val top-1   ViT pretrained", runs["pretrain-fmnist"].get("val_accuracy"),
            _command(commands["pretrain"])),
        Row("digits test top-1         logistic regression on pixels", pixels["pixels-digits"], demo_row("pixels-digits")),
        Row("digits test top-1         fine-tune from scratch (twin)", transfer_top1(out / "transfer-twin"),
            _command(commands["transfer-twin"])),
        Row("digits test top-1         fine-tune from pretrained", transfer_top1(out / "transfer-pretrained"),
            _command(commands["transfer-pretrained"])),
    ]
    for name, label in (("twin", "random-init twin"), ("pretrained", "pretrained")):
        metrics = runs.get(f"fewshot-{name}", {})
        rows += [Row(f"digits {k:2d}-shot (3 seeds)     {label}", metrics.get(f"fewshot/digits/{k}shot"),
                     _command(commands[f"fewshot-{name}"])) for k in SHOTS]
    return rows


def format_table(rows: list[Row]) -> str:
    lines = []
    for row in rows:
        value = f"{100 * row.value:6.2f} %" if row.value is not None else "   n/a  "
        lines += [f"  {row.name:58s} {value}", f"      $ {row.command}"]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    if args.row:
        print(f"{args.row}: top-1 {100 * pixel_logreg(args.row.removeprefix('pixels-'), args.fmnist_root):.2f} %")
        return 0
    start = time.time()
    out = Path(args.out)
    shards = out / "shards" / "fmnist"
    write_shards(args.fmnist_root, shards)
    parent = MLflowTracker(tracking_uri=args.tracking_uri, experiment="vitscale-demo", run_name="demo", tags={"stage": "demo"})
    commands = run_stages(args, out, shards, parent.run_id)
    pixels = {key: pixel_logreg(key.removeprefix("pixels-"), args.fmnist_root) for key in ("pixels-fmnist", "pixels-digits")}
    runs = child_metrics(parent) | {"pretrain-fmnist": export_metrics(parent, out / "pretrain" / "export" / "model.safetensors")}
    rows = table_rows(args, out, commands, runs, pixels)
    wall = time.time() - start
    load = os.getloadavg()
    parent.log_metrics({"wall_time_s": wall})
    write_atomic(out / "results.json", json.dumps({"rows": [asdict(r) for r in rows], "wall_time_s": wall,
                                                   "load_average_1_5_15": load}, indent=1).encode())
    parent.log_artifact(out / "results.json")
    parent.close()
    print(f"\nvitscale demo results (wall time {wall / 60:.1f} min, load average {load[0]:.1f})\n{format_table(rows)}\n")
    print("Browse the runs (parent run 'demo' in experiment 'vitscale-demo'):")
    print(f"  .venv/bin/mlflow ui --backend-store-uri {args.tracking_uri} --port 5000")
    runs_page = ui_url("http://127.0.0.1:5000", f"experiments/{parent.client.get_run(parent.run_id).info.experiment_id}/runs")
    print(f"  then open {runs_page} (MLflow's model-training view; exports under Model registry)")
    return 0
