"""`python -m pretrain report --experiment NAME [--tracking-uri URI] [--out DIR]`

The table of data set x (few-shot k / fine-tune) x checkpoint, as the papers print it, built from
MLflow alone: few-shot runs (`python -m pretrain fewshot`), transfer runs (`python -m pretrain
transfer`) and the few-shot metrics a pretraining run logs every N steps. A checkpoint is a
pretraining run and step (the runs' `pretrain_run_id` / `pretrain_step` tags), named after the
pretraining run. Prints markdown; writes report.md, report.csv and report.png (bar chart, error
bars: std over seeds) to --out. In MLflow: each pretraining run gets its rows as a table artifact
(`log_table`, rendered by the run's Artifacts tab) and the PNG under `report/`; each registered
version that was evaluated gets the table in its description (and its model's), tags pointing
at both artifacts, and the alias `best-<data set>` moves to the version leading that data set.
"""
from __future__ import annotations

import argparse
import csv
import io
import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from data_pipeline.storage import write_atomic

log = logging.getLogger(__name__)
FEWSHOT_KEY = re.compile(r"^fewshot/(?P<dataset>[^/]+)/(?P<shots>\d+)shot$")
FINETUNE = {"top1": "fine-tune top-1", "mean_per_class": "fine-tune mean per-class"}


@dataclass(frozen=True)
class Result:
    checkpoint: str  # label: pretraining run name @ step
    pretrain_run: str  # the pretraining run's name (its id's first 8 characters where MLflow lacks it)
    pretrain_run_id: str
    step: int | None
    dataset: str
    setting: str  # "5-shot", "fine-tune top-1", ...
    mean: float
    std: float
    seeds: int
    run_id: str  # the MLflow run the numbers come from


def _setting_order(setting: str) -> tuple[int, int]:
    """k-shot by k, then fine-tune top-1, then mean per-class."""
    shots = re.match(r"^(\d+)-shot$", setting)
    return (0, int(shots.group(1))) if shots else (1, list(FINETUNE.values()).index(setting))


def _seeds(metrics: dict[str, float], key: str) -> int:
    return sum(1 for k in metrics if re.fullmatch(re.escape(key) + r"/seed\d+", k)) or 1


def _all_runs(client, experiment_id: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], max_results=1000, page_token=token, order_by=["attributes.start_time ASC"])
        runs.extend(page)
        token = page.token
        if not token:
            return runs


class _Labels:
    """Pretraining run names, looked up once per run id."""

    def __init__(self, client):
        self.client, self.names = client, {}

    def name(self, run_id: str, fallback: str) -> str:
        if run_id not in self.names:
            from mlflow.exceptions import MlflowException

            try:
                self.names[run_id] = self.client.get_run(run_id).info.run_name or run_id[:8]
            except MlflowException:  # the pretraining run lives elsewhere
                self.names[run_id] = fallback if run_id in ("", "None") else run_id[:8]
        return self.names[run_id]


def _label(name: str, step: int | None) -> str:
    return name if step is None else f"{name}@{step}"


def _int_or_none(value: str | None) -> int | None:
    return int(value) if value not in (None, "", "None") else None


def run_results(run, *, checkpoint: str = "", pretrain_run: str = "") -> list[Result]:
    """The final few-shot or fine-tune numbers of one `fewshot` / `transfer` run."""
    tags, metrics, run_id = run.data.tags, run.data.metrics, run.info.run_id
    source, step = tags.get("pretrain_run_id", ""), _int_or_none(tags.get("pretrain_step"))
    out = []
    if tags.get("stage") == "fewshot":
        for key, value in metrics.items():
            if m := FEWSHOT_KEY.match(key):
                out.append(Result(checkpoint, pretrain_run, source, step, m["dataset"], f"{m['shots']}-shot", value,
                                  metrics.get(f"{key}/std", 0.0), _seeds(metrics, key), run_id))
    elif tags.get("stage") == "transfer":
        for key, setting in FINETUNE.items():
            if key in metrics:
                out.append(Result(checkpoint, pretrain_run, source, step, tags.get("dataset", "?"), setting, metrics[key],
                                  metrics.get(f"{key}/std", 0.0), _seeds(metrics, key), run_id))
    return out


def _pretraining_results(client, run, labels: _Labels) -> list[Result]:
    """Few-shot evaluated during pretraining: every logged step is a checkpoint."""
    out, run_id = [], run.info.run_id
    for key in run.data.metrics:
        m = FEWSHOT_KEY.match(key)
        if not m:
            continue
        stds = {h.step: h.value for h in client.get_metric_history(run_id, f"{key}/std")}
        pre = labels.name(run_id, run_id[:8])
        for point in client.get_metric_history(run_id, key):
            out.append(Result(_label(pre, point.step), pre, run_id, point.step, m["dataset"], f"{m['shots']}-shot", point.value,
                              stds.get(point.step, 0.0), _seeds(run.data.metrics, key), run_id))
    return out


def collect_results(client, experiment_id: str) -> list[Result]:
    """Every few-shot and fine-tune number of the experiment; a later run replaces an earlier one."""
    labels = _Labels(client)
    found: dict[tuple, Result] = {}
    for run in _all_runs(client, experiment_id):
        tags = run.data.tags
        if tags.get("stage") in ("fewshot", "transfer"):
            pre = labels.name(tags.get("pretrain_run_id", ""), tags.get("model_source", run.info.run_id[:8]))
            results = run_results(run, checkpoint=_label(pre, _int_or_none(tags.get("pretrain_step"))), pretrain_run=pre)
        elif tags.get("stage") == "pretrain":
            results = _pretraining_results(client, run, labels)
        else:
            continue
        found.update({(r.checkpoint, r.dataset, r.setting): r for r in results})
    return sorted(found.values(), key=lambda r: (r.dataset, _setting_order(r.setting), r.pretrain_run, r.step or 0))


def checkpoints_of(results: list[Result]) -> list[str]:
    """Column order: by pretraining run name, then step."""
    keys = {r.checkpoint: (r.pretrain_run, r.step or 0) for r in results}
    return sorted(keys, key=keys.get)


def markdown_table(results: list[Result]) -> str:
    columns = checkpoints_of(results)
    cells = {(r.dataset, r.setting, r.checkpoint): f"{100 * r.mean:.1f} ± {100 * r.std:.1f}" for r in results}
    rows = sorted({(r.dataset, r.setting) for r in results}, key=lambda k: (k[0], _setting_order(k[1])))
    lines = ["| data set | evaluation | " + " | ".join(columns) + " |", "|---|---|" + "---:|" * len(columns)]
    for dataset, setting in rows:
        lines.append(f"| {dataset} | {setting} | " + " | ".join(cells.get((dataset, setting, c), "–") for c in columns) + " |")
    return "\n".join(lines)


def csv_text(results: list[Result]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(Result.__dataclass_fields__))
    writer.writeheader()
    writer.writerows(asdict(r) for r in results)
    return out.getvalue()


def bar_chart(results: list[Result], path: Path, title: str) -> None:
    """One panel per data set; groups of bars per evaluation, one bar per checkpoint, std as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({r.dataset for r in results})
    columns = checkpoints_of(results)
    panel_width = 1.5 + 0.3 * len(columns) * max(len({r.setting for r in results if r.dataset == d}) for d in datasets)
    fig, axes = plt.subplots(1, len(datasets), figsize=(min(40.0, panel_width * len(datasets) + 2), 3.8), squeeze=False)
    width = 0.8 / len(columns)
    for ax, dataset in zip(axes[0], datasets):
        settings = sorted({r.setting for r in results if r.dataset == dataset}, key=_setting_order)
        by_key = {(r.setting, r.checkpoint): r for r in results if r.dataset == dataset}
        for i, column in enumerate(columns):
            rs = [by_key.get((s, column)) for s in settings]
            ax.bar(np.arange(len(settings)) + (i - (len(columns) - 1) / 2) * width, [100 * r.mean if r else 0 for r in rs], width,
                   yerr=[100 * r.std if r else 0 for r in rs], capsize=2, label=column)
        ax.set_xticks(np.arange(len(settings)), [s.replace("fine-tune ", "ft ") for s in settings], rotation=30, ha="right", fontsize=8)
        ax.set_title(dataset)
        ax.set_ylim(0, 100)
        ax.set_ylabel("accuracy (%)")
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle(title)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    plt.close(fig)
    write_atomic(path, png.getvalue())


def build_report(*, experiment: str, tracking_uri: str, out: Path) -> tuple[str, list[Result]]:
    """Write report.md / report.csv / report.png under `out`; return the markdown and the rows."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        known = ", ".join(e.name for e in client.search_experiments()) or "none"
        raise LookupError(f"no MLflow experiment {experiment!r} at {tracking_uri} (experiments there: {known})")
    results = collect_results(client, exp.experiment_id)
    if not results:
        raise LookupError(f"experiment {experiment!r} at {tracking_uri} has no few-shot or fine-tune results yet; "
                          "run `python -m pretrain fewshot` or `python -m pretrain transfer` with tracking.experiment="
                          f"{experiment}")
    text = f"# {experiment}: accuracy (%), mean ± std over seeds\n\n{markdown_table(results)}\n"
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "report.md", text.encode())
    write_atomic(out / "report.csv", csv_text(results).encode())
    bar_chart(results, out / "report.png", f"{experiment}: accuracy (%)")
    from mlflow.exceptions import MlflowException

    try:
        publish(client, results, markdown_table(results), experiment=experiment, png=out / "report.png")
    except MlflowException as err:  # e.g. a server's store read directly: its artifacts need the server
        log.warning("report written to %s but not published to MLflow: %s", out, err.message.splitlines()[0])
    return text, results


def table_columns(results: list[Result]) -> dict[str, list]:
    """The rows as MLflow's table artifact (`log_table`) takes them: one column per field, accuracy in %."""
    return {"data set": [r.dataset for r in results], "evaluation": [r.setting for r in results],
            "checkpoint": [r.checkpoint for r in results], "accuracy (%)": [round(100 * r.mean, 2) for r in results],
            "std (%)": [round(100 * r.std, 2) for r in results], "seeds": [r.seeds for r in results],
            "run": [r.run_id for r in results]}


def _log_table(client, run_id: str, results: list[Result]) -> str:
    """`report/transfer_table-<digest>.json`: log_table appends to an existing file, so one file per distinct table."""
    import hashlib

    columns = table_columns(results)
    path = f"report/transfer_table-{hashlib.sha256(repr(columns).encode()).hexdigest()[:10]}.json"
    if path not in {f.path for f in client.list_artifacts(run_id, "report")}:
        client.log_table(run_id, data=columns, artifact_file=path)
    return path


def best_checkpoints(results: list[Result]) -> dict[str, str]:
    """Per data set, the checkpoint leading its headline row: fine-tune top-1, else the most shots."""
    best = {}
    for dataset in sorted({r.dataset for r in results}):
        rows = [r for r in results if r.dataset == dataset]
        settings = {r.setting for r in rows}
        headline = FINETUNE["top1"] if FINETUNE["top1"] in settings else max(settings, key=_setting_order)
        best[dataset] = max((r for r in rows if r.setting == headline), key=lambda r: r.mean).checkpoint
    return best


def publish(client, results: list[Result], table: str, *, experiment: str, png: Path) -> None:
    """The report in MLflow: on each pretraining run its rows as a table artifact and the PNG; in the Model
    Registry the table in the descriptions of the evaluated versions, and the `best-<data set>` aliases."""
    from mlflow.exceptions import MlflowException

    from pretrain.tracking.model_registry import publish_report, version_of

    evaluated = [r for r in results if r.run_id != r.pretrain_run_id]  # exports, not in-training checkpoints
    versions = {}
    for r in evaluated:
        if r.checkpoint not in versions:
            version = version_of(client, pretrain_run_id=r.pretrain_run_id, step=str(r.step))
            if version is not None:
                versions[r.checkpoint] = version
    for run_id in sorted({r.pretrain_run_id for r in results}):
        try:
            client.get_run(run_id)
        except MlflowException:  # the pretraining run lives elsewhere
            continue
        table_path = _log_table(client, run_id, [r for r in results if r.pretrain_run_id == run_id])
        client.log_artifact(run_id, str(png), "report")
        for version in versions.values():
            if version.run_id == run_id:
                client.set_model_version_tag(version.name, version.version, "report table", f"runs:/{run_id}/{table_path}")
                client.set_model_version_tag(version.name, version.version, "report chart", f"runs:/{run_id}/report/{png.name}")
    publish_report(client, versions, best_checkpoints([r for r in evaluated if r.checkpoint in versions]), table, experiment)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--experiment", required=True, help="MLflow experiment of the fewshot / transfer runs")
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db", help="sqlite:///file.db or http://host:port")
    parser.add_argument("--out", default=None, help="folder for report.md/.csv/.png (default: reports/<experiment>)")


def main(args: argparse.Namespace) -> int:
    out = Path(args.out or Path("reports") / args.experiment)
    text, results = build_report(experiment=args.experiment, tracking_uri=args.tracking_uri, out=out)
    print(text)
    print(f"{len(results)} results -> {out / 'report.md'}, {out / 'report.csv'}, {out / 'report.png'}")
    return 0
