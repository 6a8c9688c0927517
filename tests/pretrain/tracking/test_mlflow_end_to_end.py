"""The tiny path tracked in a real `mlflow server`, checked through its client and its UI in Chromium.

pretrain -> export (registered as a version) -> few-shot of `models:/...@latest` -> transfer of
`models:/.../1` -> report: the version carries the numbers and the `best-digits` alias, the
pretraining run its datasets, system metrics, the report's table artifact and PNG.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pretrain.__main__ import main as cli

CONFIG = "configs/pretrain/demo_fmnist.yaml"
MODEL = "vitscale-vit_demo"
REPO = Path(__file__).resolve().parents[3]
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1400,1000"]


@pytest.fixture(scope="module")
def _short_system_metrics():
    """One system-metrics sample a second, so a seconds-long run records several."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
        yield


def tiny_path(url: str, shards: dict, run_module, out: Path) -> dict:
    """The stages as a user runs them, all tracked in the server at `url`; returns the runs by stage."""
    run_module(["pretrain", "train", "--config", CONFIG, f"data.train_urls={shards['train']}", f"data.val_urls={shards['val']}",
                f"train.output_dir={out / 'pretrain'}", f"tracking.tracking_uri={url}", "tracking.experiment=e2e",
                "train.steps=6", "train.log_every=3", "data.batch_size=32", "engine.zero_stage=0"])
    assert cli(["fewshot", "--model", f"models:/{MODEL}@latest", "--dataset", "digits", "--shots", "2", "5", "--seeds", "0", "1",
                "--l2", "1.0", "--max-train-per-class", "5", "--max-test", "100", "--tracking-uri", url, "--experiment", "e2e"]) == 0
    run_module(["pretrain", "transfer", "--config", "configs/transfer/demo_digits.yaml", f"model=models:/{MODEL}/1",
                "lr_grid=[]", "steps=4", "data.batch_size=32", "optim.warmup_steps=0", f"output_dir={out / 'transfer'}",
                f"tracking.tracking_uri={url}", "tracking.experiment=e2e"])
    assert cli(["report", "--experiment", "e2e", "--tracking-uri", url, "--out", str(out / "report")]) == 0
    client = MlflowClient(url)
    exp = client.get_experiment_by_name("e2e")
    runs = {r.data.tags["stage"]: r for r in client.search_runs([exp.experiment_id])}
    return {"experiment": exp, **runs}


def check_registry(client: MlflowClient, runs: dict) -> None:
    pre, transfer, fewshot = runs["pretrain"], runs["transfer"], runs["fewshot"]
    (version,) = client.search_model_versions(f"name = '{MODEL}'")
    assert version.run_id == pre.info.run_id and version.source == f"runs:/{pre.info.run_id}/model"
    assert client.get_registered_model(MODEL).aliases == {"best-digits": "1"}
    top1 = transfer.data.metrics["top1"]
    assert version.tags["digits/fine-tune top-1"] == f"{100 * top1:.1f} ± 0.0"
    assert version.tags["digits/transfer run"].endswith(f"/runs/{transfer.info.run_id}?workflowType=machine_learning")
    assert version.tags["digits/5-shot"].startswith(f"{100 * fewshot.data.metrics['fewshot/digits/5shot']:.1f} ± ")
    assert f"{100 * top1:.1f} ± 0.0" in version.description
    # `models:/NAME@latest` was accepted and resolved to that version's pretraining run
    assert fewshot.data.tags["model_source"] == f"models:/{MODEL}@latest"
    assert fewshot.data.tags["pretrain_run_id"] == transfer.data.tags["pretrain_run_id"] == pre.info.run_id


def check_pretraining_run(client: MlflowClient, runs: dict, shards: dict) -> str:
    """Source, datasets, system metrics and the report's artifacts; returns the table artifact's path."""
    pre, exp = runs["pretrain"], runs["experiment"]
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert pre.data.tags["mlflow.source.name"] == "python -m pretrain train"
    commit = pre.data.tags["mlflow.source.git.commit"]  # this checkout's HEAD then, so HEAD or an ancestor now
    assert subprocess.run(["git", "merge-base", "--is-ancestor", commit, "HEAD"], cwd=REPO).returncode == 0
    index = hashlib.sha256((Path(shards["dir"]) / "_info.json").read_bytes()).hexdigest()
    logged = {i.tags[0].value: i.dataset for i in pre.inputs.dataset_inputs}
    assert set(logged) == {"train", "val"}
    assert logged["train"].digest == logged["val"].digest == index[:16]
    assert logged["train"].name == "train" or logged["train"].name.endswith("/train")
    assert json.loads(logged["train"].profile) == {"num_samples": 3000, "num_shards": 6, "index_sha256": index}
    assert json.loads(logged["val"].profile)["num_samples"] == 500
    assert json.loads(logged["train"].source)["uri"].endswith(Path(shards["train"]).name)
    (digits,) = runs["transfer"].inputs.dataset_inputs
    assert digits.dataset.name == "digits" and len(digits.dataset.digest) == 16
    host = socket.gethostname()
    system = [k for k in pre.data.metrics if k.startswith(f"system/{host}/")]
    assert {f"system/{host}/cpu_utilization_percentage", f"system/{host}/system_memory_usage_megabytes"} <= set(system)
    assert len(client.get_metric_history(pre.info.run_id, f"system/{host}/cpu_utilization_percentage")) >= 2
    files = {f.path for f in client.list_artifacts(pre.info.run_id, "report")}
    (table,) = [f for f in files if f.endswith(".json")]
    assert "report/report.png" in files
    assert json.loads(pre.data.tags["mlflow.loggedArtifacts"]) == [{"path": table, "type": "table"}]
    return table


def browser(profile: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"))


def shows(driver, text: str, timeout: float = 60) -> bool:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout).until(lambda d: text in d.find_element(By.TAG_NAME, "body").text)
    return True


def test_tiny_path_in_mlflow_and_in_its_ui(fmnist_shards, run_module, mlflow_server, tmp_path, _short_system_metrics):
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.fail("Chromium missing: `make test-deps` installs Debian's chromium and chromium-driver")
    url = mlflow_server["url"]
    runs = tiny_path(url, fmnist_shards, run_module, tmp_path)
    client = MlflowClient(url)
    check_registry(client, runs)
    table = check_pretraining_run(client, runs, fmnist_shards)

    top1 = f"{100 * runs['transfer'].data.metrics['top1']:.1f}"
    exp_id, pre_id = runs["experiment"].experiment_id, runs["pretrain"].info.run_id
    ui = "?workflowType=machine_learning"  # MLflow 3.17's UI opens GenAI pages unless its switch says otherwise
    driver = browser(tmp_path / "chromium-profile")
    try:
        driver.get(f"{url}/#/experiments/{exp_id}{ui}")  # the training runs, with their Dataset and Source columns
        assert shows(driver, "python -m pretrain train") and shows(driver, "train (") and "/runs" in driver.current_url
        driver.save_screenshot(str(tmp_path / "runs.png"))
        driver.get(f"{url}/#/models/{MODEL}{ui}")
        assert shows(driver, f"{top1} ± 0.0") and shows(driver, "best-digits")
        driver.save_screenshot(str(tmp_path / "registered_model.png"))
        driver.get(f"{url}/#/experiments/{exp_id}/runs/{pre_id}/artifacts/{table}{ui}")
        cell = f"{round(100 * runs['transfer'].data.metrics['top1'], 2):g}"  # the table's "accuracy (%)" as the page prints it
        assert shows(driver, "fine-tune top-1") and shows(driver, cell)
        driver.save_screenshot(str(tmp_path / "table_artifact.png"))
    finally:
        driver.quit()
    assert (tmp_path / "registered_model.png").stat().st_size > 10_000
