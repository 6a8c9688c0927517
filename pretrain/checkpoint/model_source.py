"""Where an exported model comes from: a local file, an S3 object, or a pretraining run in MLflow.

    export/model.safetensors          a local export (its .json sidecar beside it)
    s3://bucket/prefix/model.safetensors  downloaded, sidecar included, by data_pipeline.storage
                                      (boto3: endpoint and keys from the usual AWS_* variables;
                                      http(s):// URLs work the same way)
    runs:/<run id>[/<artifact path>]  the `model` artifacts that `python -m pretrain train` logs
    mlflow:<run id>                   the same
    models:/<name>@<alias>            a version of the Model Registry (`pretrain.tracking.model_registry`):
    models:/<name>/<version>          by alias (`best-cifar10`; `latest` is the newest version),
                                      by number, or `models:/<name>/latest`

`local_exported(source, tracking_uri=...)` yields a local .safetensors path for `load_exported`;
downloads live in a temp folder removed on exit.
"""
from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

SOURCE_HELP = ("exported .safetensors, s3://bucket/key.safetensors (or http(s)://), runs:/<run id>, mlflow:<run id>, "
               "models:/<name>@<alias> or models:/<name>/<version>")
REMOTE_SCHEMES = ("s3://", "http://", "https://")


def _download_url(url: str, dest: Path) -> Path:
    """The weights and their sidecar, through data_pipeline's resuming s3:// / http(s):// openers."""
    from data_pipeline.storage import open_url

    if not url.endswith(".safetensors"):
        raise ValueError(f"model {url!r}: expected s3://bucket/path/model.safetensors (its .json sidecar beside it)")
    weights = dest / url.rsplit("/", 1)[-1]
    for remote, local in ((url, weights), (url.removesuffix(".safetensors") + ".json", weights.with_suffix(".json"))):
        try:
            with open_url(remote) as src, open(local, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{err}; an exported model is the .safetensors and its .json sidecar side by side") from None
    return weights


def _download_run(run_id: str, artifact_path: str, dest: Path, tracking_uri: str | None) -> Path:
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    try:
        folder = Path(download_artifacts(run_id=run_id, artifact_path=artifact_path, dst_path=str(dest), tracking_uri=tracking_uri))
    except MlflowException as err:
        raise FileNotFoundError(f"MLflow run {run_id} at {tracking_uri}: no {artifact_path!r} artifacts ({err.message}); "
                                "a `python -m pretrain train` run logs its export there") from None
    found = sorted(folder.rglob("*.safetensors")) if folder.is_dir() else [folder]
    if len(found) != 1 or found[0].suffix != ".safetensors":
        raise FileNotFoundError(f"MLflow run {run_id}: artifacts {artifact_path!r} should hold one exported .safetensors "
                                f"(and its .json), found {[p.name for p in found]}")
    return found[0]


def parse_run_source(source: str) -> tuple[str, str] | None:
    """(run id, artifact path) of `runs:/<id>[/path]` or `mlflow:<id>`; None for other sources."""
    if source.startswith("runs:/"):
        run_id, _, path = source.removeprefix("runs:/").strip("/").partition("/")
        return run_id, path or "model"
    if source.startswith("mlflow:"):
        return source.removeprefix("mlflow:").strip("/"), "model"
    return None


@contextlib.contextmanager
def local_exported(source: str, *, tracking_uri: str | None = None) -> Iterator[Path]:
    """A local path of the exported model `source` (see the module doc), valid inside the `with`."""
    if source.startswith("models:/"):  # a registered version is a pretraining run's `model` artifacts
        from pretrain.tracking.model_registry import resolve_version

        source = resolve_version(source, tracking_uri=tracking_uri).source
    run = parse_run_source(source)
    if not source.startswith(REMOTE_SCHEMES) and run is None:
        yield Path(source)
        return
    with tempfile.TemporaryDirectory(prefix="vitscale-model-") as tmp:
        if run is not None:
            if not run[0]:
                raise ValueError(f"model {source!r}: expected runs:/<run id> or mlflow:<run id>")
            yield _download_run(*run, Path(tmp), tracking_uri)
        else:
            yield _download_url(source, Path(tmp))


def provenance_tags(meta: dict[str, Any], source: str) -> dict[str, str]:
    """Tags linking a transfer or few-shot run to the pretraining run and step it evaluates."""
    return {
        "pretrain_run_id": str(meta.get("run_id")),
        "pretrain_step": str(meta.get("step")),
        "model": str(meta.get("model")),
        "model_source": source,
    }
