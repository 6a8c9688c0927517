"""Export a training checkpoint to one safetensors file (+ a JSON sidecar) and load it back.

The weights are the backbone's alone, with timm's parameter names, so
`timm.create_model(meta["timm_name"], **meta["timm_kwargs"])` loads them with strict=True
wherever timm has the architecture; `pretrain.checkpoint.weights.load_exported` rebuilds every model of the project.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from safetensors.torch import save_file

from data_pipeline import storage
from data_pipeline.storage import atomic_path, write_atomic
from pretrain.models import export_spec
from pretrain.checkpoint.weights import load_exported, sidecar_path  # noqa: F401  (the reading side: pretrain.checkpoint.weights)

BACKBONE_PREFIX = "backbone."


def save_exported(state_dict: dict[str, torch.Tensor], path: str | Path, meta: dict[str, Any], dtype: torch.dtype = torch.float32) -> Path:
    """Write weights, then sidecar, each atomically (temp name, fsync, rename)."""
    path = Path(path)
    tensors = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous() for k, v in state_dict.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    side = {**meta, **export_spec(meta["model"], num_classes=meta["num_classes"], **meta.get("model_kwargs", {}))}
    write_atomic(sidecar_path(path), json.dumps(side, indent=1).encode())
    return path


def backbone_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep the backbone's tensors of an objective's state dict, with the prefix removed."""
    out = {k[len(BACKBONE_PREFIX):]: v for k, v in state_dict.items() if k.startswith(BACKBONE_PREFIX)}
    if not out:
        raise KeyError("checkpoint holds no 'backbone.' tensors: was it written by `python -m pretrain train`?")
    return out


def weights_source(*, zero_stage: int, precision: str, dtype: torch.dtype, weights: str) -> str:
    """Where a checkpoint's weights are read from, the cheapest exact way.

    "ema": the averaged weights (`train.ema`). "model_states": ZeRO-0/1/2 keep the whole module
    in `mp_rank_00_model_states.pt`, in the training precision: exact for an fp32 run, and for a
    bf16 export of a bf16 run (the module holds the bf16 rounding of the fp32 master); read
    memory-mapped with weights_only=True, so stage 0's optimizer state in the same file is not
    read. "zero_to_fp32": ZeRO-3 (the module holds placeholders) and fp32 exports of bf16 runs
    rebuild the fp32 master from each rank's partition with DeepSpeed's zero_to_fp32, which
    memory-maps the files and drops the optimizer moments unread.
    """
    if weights == "ema":
        return "ema"
    if zero_stage < 3 and (precision == "fp32" or dtype == torch.bfloat16):
        return "model_states"
    return "zero_to_fp32"


def _source_files(source: str) -> tuple[str, ...]:
    """Glob patterns of the checkpoint files a source reads (all that is fetched from S3)."""
    return {"model_states": ("mp_rank_00_model_states.pt",), "zero_to_fp32": ("*model_states.pt", "*optim_states.pt"),
            "ema": ("ema*",)}[source]


def consolidated_state_dict(folder: Path, source: str) -> dict[str, torch.Tensor]:
    """Full weights of the objective (all its parameters and buffers) in the checkpoint `folder`."""
    if source == "ema":
        from pretrain.engine.ema import consolidated_ema

        return consolidated_ema(folder)
    if source == "model_states":
        states = torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True, mmap=True)
        return dict(states["module"])
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    lazy = get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name, lazy_mode=True)
    return {k: v.contiguous() for k, v in lazy.items()}


def _source_names(folder: Path, meta: dict[str, Any], source: str) -> list[str]:
    """The manifest's files that `source` reads."""
    from fnmatch import fnmatch

    if "files" not in meta:
        return []
    return sorted(k for k in meta["files"] if "/" not in k and any(fnmatch(k, pat) for pat in _source_files(source)))


def _fetch_checkpoint(uri: str, tag: str | None, workdir: Path, *, dtype: torch.dtype, weights: str) -> tuple[Path, str]:
    """Download from `uri` (an s3:// checkpoints folder) only the files the export reads,
    each checked against the checkpoint's manifest."""
    from pretrain.checkpoint.checkpointer import META, checked_tag, download_checkpoint

    latest = storage.join_url(uri, "latest")
    tag = tag or storage.read_text(latest)
    if tag is None:
        raise FileNotFoundError(f"{uri} has no 'latest' object: is it a train.remote_uri/checkpoints folder?")
    tag = checked_tag(tag, latest)
    meta_text = storage.read_text(storage.join_url(uri, tag, META))
    if meta_text is None:
        raise FileNotFoundError(f"{storage.join_url(uri, tag, META)} does not exist: not a complete checkpoint")
    meta = json.loads(meta_text)
    engine = meta["config"]["engine"]
    source = weights_source(zero_stage=engine["zero_stage"], precision=engine["precision"], dtype=dtype, weights=weights)
    download_checkpoint(storage.join_url(uri, tag), workdir / tag, _source_names(workdir / tag, meta, source))
    return workdir, tag


def export_checkpoint(checkpoint_dir: str | Path, out: str | Path, *, tag: str | None = None, dtype: torch.dtype = torch.float32,
                      weights: str = "model") -> str | Path:
    """`<output_dir>/checkpoints` (latest tag, or `tag`) -> safetensors + sidecar at `out`.

    `weights`: "model" or "ema" (the moving average, with `train.ema`). Either end may be an
    s3:// URI: only the files the export reads are downloaded; the result is uploaded.
    """
    import tempfile

    from pretrain.checkpoint.checkpointer import checked_tag, verify_files

    if weights not in ("model", "ema"):
        raise ValueError(f"weights must be 'model' or 'ema', not {weights!r}")
    with tempfile.TemporaryDirectory(prefix="export-") as work:
        if storage.is_s3(checkpoint_dir):
            checkpoint_dir, tag = _fetch_checkpoint(str(checkpoint_dir), tag, Path(work) / "in", dtype=dtype, weights=weights)
        checkpoint_dir = Path(checkpoint_dir)
        if tag is None:
            latest = checkpoint_dir / "latest"
            if not latest.is_file():
                raise FileNotFoundError(f"{checkpoint_dir} has no 'latest' file: is it a train.output_dir/checkpoints folder?")
            tag = latest.read_text()
        tag = checked_tag(tag, str(checkpoint_dir / "latest"))
        meta_path = checkpoint_dir / tag / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path} missing: {checkpoint_dir / tag} is not a complete checkpoint")
        train_meta = json.loads(meta_path.read_text())
        config = train_meta["config"]
        source = weights_source(zero_stage=config["engine"]["zero_stage"], precision=config["engine"]["precision"],
                                dtype=dtype, weights=weights)
        if "files" in train_meta:  # checked before zero_to_fp32 unpickles them
            verify_files(checkpoint_dir / tag, train_meta, _source_names(checkpoint_dir / tag, train_meta, source))
        state = backbone_state_dict(consolidated_state_dict(checkpoint_dir / tag, source))
        meta = {
            "model": config["model"]["name"],
            "model_kwargs": config["model"]["kwargs"],
            "num_classes": config["data"]["num_classes"],
            "image_size": config["data"]["image_size"],
            "mean": config["data"]["mean"],
            "std": config["data"]["std"],
            "run_id": train_meta.get("run_id"),
            "step": train_meta["step"],
            "weights": weights,
        }
        if not storage.is_s3(out):
            return save_exported(state, out, meta, dtype)
        upload_exported(save_exported(state, Path(work) / "out" / Path(str(out)).name, meta, dtype), str(out))
        return str(out)


def upload_exported(local: Path, uri: str) -> None:
    """An exported file to `uri` (s3://bucket/name.safetensors) and its sidecar beside it (name.json)."""
    storage.upload_file(local, uri)
    bucket, key = storage.split_s3(uri)
    storage.upload_file(sidecar_path(local), f"s3://{bucket}/{PurePosixPath(key).with_suffix('.json')}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="train.output_dir/checkpoints, or s3://bucket/run/checkpoints")
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: latest)")
    parser.add_argument("--out", required=True, help="output .safetensors path or s3:// URI (a .json sidecar goes beside it)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--weights", choices=["model", "ema"], default="model", help="ema: the moving average (train.ema)")


def main(args: argparse.Namespace) -> int:
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    path = export_checkpoint(args.checkpoint, args.out, tag=args.tag, dtype=dtype, weights=args.weights)
    print(f"exported {path} (+ its .json sidecar)")
    return 0
