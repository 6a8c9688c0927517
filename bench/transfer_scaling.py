"""The ViT paper's central trend at CPU scale: more pretraining images, better transfer.

The demo's recipe (configs/pretrain/demo_fmnist.yaml, the same steps for every size) pretrains on
the first 2k / 6k / 20k / 60k Fashion-MNIST train images; each export then goes through the
demo's few-shot and fine-tuning commands on scikit-learn's digits, beside the random-init twin
(few-shot) and the from-scratch fine-tune with the same recipe and steps. Every number comes
from the project's own CLIs, run as a user runs them. A PNG of accuracy against pretraining
images goes to bench/transfer_scaling.png and to the MLflow run.

    .venv/bin/python bench/transfer_scaling.py [--sizes 2000 6000 20000 60000] [--shots 10]

Ends with `RESULT fewshot_gain_60k=... finetune_gain_60k=...`: at the largest size, pretrained
minus random-init twin (few-shot, at --shots) and pretrained minus scratch (fine-tune top-1),
in points. Up to 30 minutes on 2 idle cores; not part of `make test`.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from pretrain.tasks import demo
from pretrain.tracking.tracker import MLflowTracker


def _fewshot(parent: MLflowTracker, run_name: str, shots: int) -> float:
    return demo.child_metrics(parent)[run_name][f"fewshot/digits/{shots}shot"]


def measure_size(n: int, *, out: Path, args: argparse.Namespace, parent: MLflowTracker) -> dict[str, float]:
    """Pretrain on the first `n` images, then few-shot and fine-tune the export on digits."""
    shards = out / f"shards-{n}"
    per_shard = min(demo.SAMPLES_PER_SHARD, n // 8)  # enough shards for every rank's loader workers
    demo.write_shards(args.fmnist_root, shards, {"train": n, "test": demo.SPLITS["test"]}, per_shard)
    last = -(-n // per_shard) - 1
    uri = args.tracking_uri
    demo.run_stage(demo.pretrain_argv(shards=shards, train_urls=f"train-{{000000..{last:06d}}}.tar", output_dir=out / f"pretrain-{n}",
                                      nproc=args.nproc, uri=uri, run_name=f"pretrain-{n}"), parent.run_id)
    exported = out / f"pretrain-{n}" / "export" / "model.safetensors"
    demo.run_stage(demo.fewshot_argv(exported, uri=uri, run_name=f"fewshot-{n}"), parent.run_id)
    demo.run_stage(demo.transfer_argv(exported, output_dir=out / f"transfer-{n}", uri=uri, run_name=f"transfer-{n}"), parent.run_id)
    return {"images": n, "fewshot": _fewshot(parent, f"fewshot-{n}", args.shots),
            "finetune": demo.transfer_top1(out / f"transfer-{n}")}


def baselines(exported: Path, *, out: Path, args: argparse.Namespace, parent: MLflowTracker) -> dict[str, float]:
    """The random-init twin's few-shot and the from-scratch fine-tune (the same for every size)."""
    twin = out / "twin" / "model.safetensors"
    uri = args.tracking_uri
    demo.run_stage(["-m", "pretrain", "twin", "--model", str(exported), "--out", str(twin)], parent.run_id)
    demo.run_stage(demo.fewshot_argv(twin, uri=uri, run_name="fewshot-twin"), parent.run_id)
    demo.run_stage(demo.transfer_argv(twin, output_dir=out / "transfer-twin", uri=uri, run_name="transfer-twin"), parent.run_id)
    return {"fewshot": _fewshot(parent, "fewshot-twin", args.shots), "finetune": demo.transfer_top1(out / "transfer-twin")}


def plot(points: list[dict[str, float]], base: dict[str, float], shots: int, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    sizes = [p["images"] for p in points]
    for key, label, colour in (("fewshot", f"{shots}-shot ridge", "tab:blue"), ("finetune", "fine-tune top-1", "tab:orange")):
        ax.plot(sizes, [100 * p[key] for p in points], "o-", color=colour, label=f"pretrained, {label}")
        ax.axhline(100 * base[key], ls="--", color=colour, label=f"random init, {label}")
    ax.set(xscale="log", xlabel="Fashion-MNIST pretraining images (same steps)", ylabel="digits test accuracy (%)",
           title="Transfer to digits against pretraining data")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 6000, 20000, 60000])
    parser.add_argument("--shots", type=int, default=10, help="the few-shot count the RESULT line reports")
    parser.add_argument("--fmnist-root", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--out", default="bench_out/transfer_scaling")
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    parser.add_argument("--nproc", type=int, default=2)
    args = parser.parse_args()
    out = Path(args.out)
    parent = MLflowTracker(tracking_uri=args.tracking_uri, experiment="vitscale-demo", run_name="transfer-scaling",
                           tags={"stage": "bench"})
    points = [measure_size(n, out=out, args=args, parent=parent) for n in sorted(args.sizes)]
    base = baselines(out / f"pretrain-{max(args.sizes)}" / "export" / "model.safetensors", out=out, args=args, parent=parent)
    for p in points:
        print(f"{p['images']:6d} images: {args.shots}-shot {100 * p['fewshot']:.1f} % (twin {100 * base['fewshot']:.1f}), "
              f"fine-tune {100 * p['finetune']:.1f} % (scratch {100 * base['finetune']:.1f})")
        parent.log_metrics({f"fewshot_{args.shots}shot": p["fewshot"], "finetune_top1": p["finetune"]}, step=p["images"])
    png = plot(points, base, args.shots, Path("bench/transfer_scaling.png"))
    parent.log_artifact(png)
    (out / "results.json").write_text(json.dumps({"points": points, "baselines": base, "load_average": os.getloadavg()}, indent=1))
    parent.close()
    top = points[-1]
    print(f"RESULT fewshot_gain_{top['images'] // 1000}k={100 * (top['fewshot'] - base['fewshot']):.1f} "
          f"finetune_gain_{top['images'] // 1000}k={100 * (top['finetune'] - base['finetune']):.1f}")


if __name__ == "__main__":
    main()
