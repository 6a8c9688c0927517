"""Few-shot evaluation time: our closed-form ridge vs scikit-learn's LogisticRegression, same features.

    .venv/bin/python bench/fewshot_speed.py [--model export/model.safetensors] [--dataset digits ...]

Features are computed once (not timed). Ours runs the whole protocol: the l2 chosen from scenic's
30-value grid on the dev split, then 1/5/10/25 shots x 3 seeds scored on test. scikit-learn fits a
standardised multinomial LogisticRegression (lbfgs, its default C=1, no search) per shots x seed.
Both run with --threads BLAS threads (default 1: these matrices are small, and a shared machine
makes more threads slower, not faster). Times are medians over --repeats; the last line is
`RESULT fewshot_speedup=<sklearn time / ours> acc_delta=<our mean accuracy minus sklearn's, points>`.
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import scipy.linalg  # noqa: F401  (loaded before threadpool_limits, which only reaches loaded libraries)
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from pretrain.evaluation.fewshot_ridge import FeatureSet, sample_shots
from pretrain.tasks.fewshot import fewshot_features, score_fewshot
from pretrain.models import build_model
from pretrain.checkpoint.weights import load_exported

DEMO_EXPORT = Path("demo_out/pretrain/export/model.safetensors")


def ours(sets: dict[str, FeatureSet], shots, seeds) -> dict[str, dict[int, list[float]]]:
    return score_fewshot(sets, shots=shots, seeds=seeds).accuracy


def sklearn_logreg(sets: dict[str, FeatureSet], shots, seeds) -> dict[str, dict[int, list[float]]]:
    out = {}
    for name, f in sets.items():
        out[name] = {}
        for k in shots:
            accs = []
            for seed in seeds:
                idx = sample_shots(f.train_y, k, seed)
                clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # 1-shot: StandardScaler sees one point per class
                    clf.fit(f.train_x[idx], f.train_y[idx])
                accs.append(float((clf.predict(f.test_x) == f.test_y).mean()))
            out[name][k] = accs
    return out


def timed(fn, *args, repeats: int):
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def mean_accuracy(table) -> float:
    return float(np.mean([a for t in table.values() for accs in t.values() for a in accs]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help=f"exported model (default: {DEMO_EXPORT} if present, else a random vit_demo)")
    parser.add_argument("--dataset", nargs="+", default=["digits"])
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 5, 10, 25])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="BLAS / OpenMP threads for both")
    args = parser.parse_args()
    threadpool_limits(args.threads)

    path = Path(args.model) if args.model else DEMO_EXPORT
    if path.is_file():
        model, meta = load_exported(path)
        print(f"features: {path}")
    else:
        model = build_model("vit_demo", num_classes=10).eval()
        meta = {"image_size": 28, "mean": [0.5] * 3, "std": [0.5] * 3}
        print(f"features: a randomly initialised vit_demo ({path} not found; run `python -m pretrain demo` for pretrained ones)")
    sets = fewshot_features(model, datasets=args.dataset, data_root=args.data_root, image_size=meta["image_size"],
                            mean=meta["mean"], std=meta["std"])
    for name, f in sets.items():
        print(f"  {name}: train {f.train_x.shape}, test {f.test_x.shape}, {f.num_classes} classes")

    t_ours, acc_ours = timed(ours, sets, args.shots, args.seeds, repeats=args.repeats)
    t_sk, acc_sk = timed(sklearn_logreg, sets, args.shots, args.seeds, repeats=args.repeats)
    print(f"\n{'data set':12s} {'shots':>5s} {'ours %':>8s} {'sklearn %':>10s}")
    for name in sets:
        for k in args.shots:
            print(f"{name:12s} {k:5d} {100 * np.mean(acc_ours[name][k]):8.2f} {100 * np.mean(acc_sk[name][k]):10.2f}")
    fits = len(args.shots) * len(args.seeds) * len(sets)
    print(f"\nmedian of {args.repeats}, {args.threads} thread(s): ours {t_ours * 1e3:.1f} ms (l2 grid of 30 on dev + {fits} test fits), "
          f"sklearn LogisticRegression {t_sk * 1e3:.1f} ms ({fits} fits)")
    print(f"RESULT fewshot_speedup={t_sk / t_ours:.1f} acc_delta={100 * (mean_accuracy(acc_ours) - mean_accuracy(acc_sk)):.2f}")


if __name__ == "__main__":
    main()
