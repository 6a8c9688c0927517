"""Exports in MLflow's Model Registry: one version per export, its results beside it, aliases.

    register_export    after `python -m pretrain train` exports: a version of `vitscale-<model>`
                       (or `tracking.registered_model`) whose source is the run's `model` artifacts
    attach_results     a finished transfer / few-shot run tags the version it evaluated with its
                       numbers and a link to itself (`MLflowTracker.close` calls it)
    publish_report     `python -m pretrain report`: the table in each version's and model's
                       description, and the alias `best-<data set>` on the version that leads it
    resolve_version    `models:/NAME@ALIAS` or `models:/NAME/VERSION` -> the version

MLflow reserves the alias `latest` (its `models:/NAME/latest` is the newest version), so a
version cannot carry it; `resolve_version` reads `models:/NAME@latest` as `models:/NAME/latest`,
which moves with every export as an alias would.
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion

MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+|latest))/?$")
STEP_TAG = "pretrain_step"


def registered_name(override: str | None, model: str) -> str:
    """The registered model of a recipe: `tracking.registered_model`, else `vitscale-<model.name>`."""
    return override or f"vitscale-{model}"


def _client(tracking_uri: str | None):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def register_export(client, *, name: str, run_id: str, step: int, model: str, artifact_path: str = "model") -> ModelVersion:
    """A new version of `name` (created on first use) from run `run_id`'s `artifact_path` artifacts."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, tags={"model": model},
                                       description=f"`{model}` exports of `python -m pretrain train`; "
                                                   "`python -m pretrain report` writes their transfer table here.")
    return client.create_model_version(name, source=f"runs:/{run_id}/{artifact_path}", run_id=run_id,
                                       tags={STEP_TAG: str(step), "model": model},
                                       description=f"{model} exported at step {step}")


def resolve_version(source: str, *, tracking_uri: str | None) -> ModelVersion:
    """The version `models:/NAME@ALIAS` or `models:/NAME/VERSION` names; LookupError naming what exists."""
    from mlflow.exceptions import MlflowException

    m = MODEL_URI.match(source)
    if m is None:
        raise ValueError(f"model {source!r}: expected models:/<name>@<alias> or models:/<name>/<version>")
    client, name = _client(tracking_uri), m["name"]
    try:
        if m["alias"] not in (None, "latest"):
            return client.get_model_version_by_alias(name, m["alias"])
        if m["version"] not in (None, "latest"):
            return client.get_model_version(name, m["version"])
        newest = client.search_model_versions(f"name = '{name}'", max_results=1, order_by=["version_number DESC"])
        if newest:
            return newest[0]
        problem = f"no registered model {name!r} with a version"
    except MlflowException as err:
        problem = err.message
    known = ", ".join(r.name for r in client.search_registered_models(max_results=20)) or "none"
    raise LookupError(f"model {source!r} at {tracking_uri}: {problem} (registered models there: {known})")


def version_of(client, *, pretrain_run_id: str, step: str | None, model_source: str = "",
               tracking_uri: str | None = None) -> ModelVersion | None:
    """The version a transfer run evaluated: named by its source, else the pretraining run's export at `step`."""
    if model_source.startswith("models:/"):
        return resolve_version(model_source, tracking_uri=tracking_uri)
    if pretrain_run_id in ("", "None"):
        return None
    versions = client.search_model_versions(f"run_id = '{pretrain_run_id}'")
    return max((v for v in versions if v.tags.get(STEP_TAG) == step), key=lambda v: int(v.version), default=None)


def run_link(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """The run's page where the store is a server, else its `runs:/` URI."""
    from pretrain.tracking.tracker import ui_url

    return ui_url(tracking_uri, f"experiments/{experiment_id}/runs/{run_id}") or f"runs:/{run_id}"


def attach_results(client, run, results: Iterable, tracking_uri: str) -> ModelVersion | None:
    """Tag the version `run` evaluated: `<data set>/<evaluation>` = "96.0 ± 1.0" (%) and `<data set>/<stage> run` = link."""
    tags = run.data.tags
    version = version_of(client, pretrain_run_id=tags.get("pretrain_run_id", ""), step=tags.get("pretrain_step"),
                         model_source=tags.get("model_source", ""), tracking_uri=tracking_uri)
    if version is None:
        return None
    link = run_link(tracking_uri, run.info.experiment_id, run.info.run_id)
    for r in results:
        client.set_model_version_tag(version.name, version.version, f"{r.dataset}/{r.setting}",
                                     f"{100 * r.mean:.1f} ± {100 * r.std:.1f}")
        client.set_model_version_tag(version.name, version.version, f"{r.dataset}/{tags['stage']} run", link)
    return version


def alias_name(dataset: str) -> str:
    """`best-<data set>` in the characters MLflow allows in an alias."""
    return "best-" + re.sub(r"[^\w-]", "-", dataset)


def publish_report(client, versions: dict[str, ModelVersion], best: dict[str, str], table: str, experiment: str) -> None:
    """`table` (markdown) in every version's and registered model's description; `best[data set]` names
    the checkpoint whose version gets the alias `best-<data set>`."""
    note = f"## Transfer ({experiment}, `python -m pretrain report`)\n\nAccuracy (%), mean ± std over seeds.\n\n{table}\n"
    for name in {v.name for v in versions.values()}:
        client.update_registered_model(name, description=note)
    for checkpoint, version in versions.items():
        client.update_model_version(version.name, version.version, description=f"Checkpoint `{checkpoint}`.\n\n{note}")
    for dataset, checkpoint in best.items():
        version = versions[checkpoint]
        client.set_registered_model_alias(version.name, alias_name(dataset), version.version)
