"""`python -m pretrain report` builds its table from MLflow alone: a sqlite store and a real `mlflow server`."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from pretrain.__main__ import main as cli
from pretrain.tasks.fewshot import FewshotResults, log_fewshot
from pretrain.tasks.report import build_report
from pretrain.tracking.tracker import MLflowTracker


def populate(uri: str) -> dict[str, str]:
    """What the stages log: a pretraining run with few-shot every 100 steps, a few-shot run and two
    fine-tunes of its final export, and a few-shot run of a checkpoint whose pretraining run lives elsewhere."""
    pre = MLflowTracker(tracking_uri=uri, experiment="paper", run_name="vit-s16", tags={"stage": "pretrain"})
    for step, acc in ((100, [0.30, 0.34, 0.32]), (200, [0.50, 0.52, 0.54])):
        log_fewshot(pre, FewshotResults({"cifar10": {5: acc}}, 1024.0), step=step)
    pre.log_metrics({"loss": 0.5}, step=200)
    pre.close()
    tags = {"pretrain_run_id": pre.run_id, "pretrain_step": "300", "model": "vit_s16", "model_source": f"runs:/{pre.run_id}"}
    fs = MLflowTracker(tracking_uri=uri, experiment="paper", run_name="fewshot", tags={"stage": "fewshot", **tags})
    log_fewshot(fs, FewshotResults({"cifar10": {1: [0.2, 0.3, 0.4], 5: [0.6, 0.6, 0.6]}, "pets": {5: [0.1, 0.2, 0.3]}}, 2.0))
    fs.close()
    for dataset, accs in (("cifar10", [0.95, 0.97]), ("pets", [0.80, 0.90])):
        tr = MLflowTracker(tracking_uri=uri, experiment="paper", run_name=f"transfer-{dataset}", tags={"stage": "transfer", "dataset": dataset, **tags})
        tr.log_metrics({"top1/seed0": accs[0], "top1/seed1": accs[1], "top1": sum(accs) / 2, "top1/std": abs(accs[0] - accs[1]) / 2,
                        "mean_per_class": accs[0], "mean_per_class/std": 0.0}, step=500)
        tr.close()
    other = MLflowTracker(tracking_uri=uri, experiment="paper", run_name="fewshot-elsewhere",
                          tags={"stage": "fewshot", "pretrain_run_id": "abcdef0123456789", "pretrain_step": "50"})
    log_fewshot(other, FewshotResults({"cifar10": {5: [0.25]}}, 1.0))
    other.close()
    return {"pretrain": pre.run_id}


def check_report(text: str, out: Path) -> None:
    lines = text.splitlines()
    assert lines[2] == "| data set | evaluation | abcdef01@50 | vit-s16@100 | vit-s16@200 | vit-s16@300 |"
    assert lines[4:8] == ["| cifar10 | 1-shot | – | – | – | 30.0 ± 8.2 |",
                          "| cifar10 | 5-shot | 25.0 ± 0.0 | 32.0 ± 1.6 | 52.0 ± 1.6 | 60.0 ± 0.0 |",
                          "| cifar10 | fine-tune top-1 | – | – | – | 96.0 ± 1.0 |",
                          "| cifar10 | fine-tune mean per-class | – | – | – | 95.0 ± 0.0 |"]
    assert "| pets | fine-tune top-1 | – | – | – | 85.0 ± 5.0 |" in lines
    rows = list(csv.DictReader((out / "report.csv").open()))
    assert len(rows) == 10
    pets = next(r for r in rows if r["dataset"] == "pets" and r["setting"] == "5-shot")
    assert float(pets["mean"]) == pytest.approx(0.2) and pets["seeds"] == "3" and pets["step"] == "300"
    assert (out / "report.md").read_text() == text
    with Image.open(out / "report.png") as png:
        assert png.width > 300 and png.height > 200


def test_report_from_sqlite(tracking_uri, tmp_path, capsys):
    populate(tracking_uri)
    assert cli(["report", "--experiment", "paper", "--tracking-uri", tracking_uri, "--out", str(tmp_path / "rep")]) == 0
    printed = capsys.readouterr().out
    check_report((tmp_path / "rep" / "report.md").read_text(), tmp_path / "rep")
    assert printed.startswith("# paper: accuracy (%), mean ± std over seeds")
    with pytest.raises(LookupError, match=r"no MLflow experiment 'papers' at .* \(experiments there: .*paper"):
        build_report(experiment="papers", tracking_uri=tracking_uri, out=tmp_path / "none")


def test_report_from_a_remote_mlflow_server(mlflow_server, tmp_path):
    pre = populate(mlflow_server["url"])
    text, _ = build_report(experiment="paper", tracking_uri=mlflow_server["url"], out=tmp_path / "remote")
    check_report(text, tmp_path / "remote")
    # the same store read directly gives the same table (its artifacts, behind the server, stay as they are)
    direct, _ = build_report(experiment="paper", tracking_uri=f"sqlite:///{mlflow_server['db']}", out=tmp_path / "direct")
    assert direct == text
    # the pretraining run holds its rows as a table artifact (all but the other run's checkpoint) and the PNG
    client = MlflowClient(mlflow_server["url"])
    files = {f.path for f in client.list_artifacts(pre["pretrain"], "report")}
    (table,) = files - {"report/report.png"}
    logged = json.loads(Path(client.download_artifacts(pre["pretrain"], table, str(tmp_path))).read_text())
    rows = [dict(zip(logged["columns"], row)) for row in logged["data"]]
    assert len(rows) == 9 and "abcdef01@50" not in {r["checkpoint"] for r in rows}
    (ft,) = [r for r in rows if (r["data set"], r["evaluation"]) == ("cifar10", "fine-tune top-1")]
    assert (ft["checkpoint"], ft["accuracy (%)"], ft["std (%)"], ft["seeds"]) == ("vit-s16@300", 96.0, 1.0, 2)


def test_report_moves_best_alias_and_fills_the_registry(tracking_uri, tmp_path):
    """Two registered exports fine-tuned on cifar10: `best-cifar10` follows the better one as results arrive,
    and each version carries its numbers, a link to its transfer run and the table."""
    from pretrain.tracking.tracker import MLflowTracker

    def export(name: str) -> MLflowTracker:
        pre = MLflowTracker(tracking_uri=tracking_uri, experiment="reg", run_name=name, tags={"stage": "pretrain"}, system_metrics=False)
        pre.register_model("vitscale-vit_s16", model="vit_s16", step=100)
        pre.close()
        return pre

    def transfer(pre: MLflowTracker, top1: float) -> str:
        tr = MLflowTracker(tracking_uri=tracking_uri, experiment="reg", run_name="transfer-cifar10", system_metrics=False,
                           tags={"stage": "transfer", "dataset": "cifar10", "pretrain_run_id": pre.run_id, "pretrain_step": "100",
                                 "model_source": f"runs:/{pre.run_id}"})
        tr.log_metrics({"top1": top1, "top1/std": 0.01, "mean_per_class": top1}, step=10)
        tr.close()  # tags the version it evaluated
        return tr.run_id

    a, b = export("a"), export("b")
    run_a = transfer(a, 0.90)
    transfer(b, 0.80)
    build_report(experiment="reg", tracking_uri=tracking_uri, out=tmp_path / "one")
    client = MlflowClient(tracking_uri)
    assert client.get_model_version_by_alias("vitscale-vit_s16", "best-cifar10").run_id == a.run_id
    v1 = client.get_model_version("vitscale-vit_s16", "1")
    assert v1.tags["cifar10/fine-tune top-1"] == "90.0 ± 1.0" and v1.tags["cifar10/transfer run"] == f"runs:/{run_a}"
    assert "| cifar10 | fine-tune top-1 | 90.0 ± 1.0 | 80.0 ± 1.0 |" in v1.description
    assert v1.tags["report table"].startswith(f"runs:/{a.run_id}/report/transfer_table-")
    transfer(b, 0.95)  # a later run of the same checkpoint replaces the earlier one
    build_report(experiment="reg", tracking_uri=tracking_uri, out=tmp_path / "two")
    assert client.get_model_version_by_alias("vitscale-vit_s16", "best-cifar10").run_id == b.run_id
    assert client.get_model_version("vitscale-vit_s16", "2").tags["cifar10/fine-tune top-1"] == "95.0 ± 1.0"
    assert "| cifar10 | fine-tune top-1 | 90.0 ± 1.0 | 95.0 ± 1.0 |" in client.get_registered_model("vitscale-vit_s16").description
