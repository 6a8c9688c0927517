"""`python -m pretrain twin --model EXPORT --out TWIN.safetensors`: the exported model's random-init twin.

The same architecture and sidecar (model, arguments, classes, resolution, normalisation) with
fresh weights of the model's own initialisation: the baseline that tells what pretraining added.
Every command that takes an export (few-shot, transfer, detection, analysis) takes the twin, so a
baseline row is the same command as the pretrained row with another `--model`.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from pretrain.checkpoint.export import save_exported
from pretrain.models import build_model
from pretrain.checkpoint.weights import read_exported


def write_twin(exported: str | Path, out: str | Path, *, seed: int = 0) -> Path:
    """A freshly initialised model of `exported`'s architecture, saved with its sidecar (run_id None, step 0)."""
    _, meta = read_exported(exported)
    torch.manual_seed(seed)
    model = build_model(meta["model"], num_classes=meta["num_classes"], img_size=meta["image_size"],
                        **{k: v for k, v in meta.get("model_kwargs", {}).items() if k != "img_size"})
    keep = ("model", "model_kwargs", "num_classes", "image_size", "mean", "std")
    return save_exported(model.state_dict(), out, {k: meta[k] for k in keep} | {"run_id": None, "step": 0, "init_seed": seed})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="an exported .safetensors file (its .json sidecar beside it)")
    parser.add_argument("--out", required=True, help="the twin's .safetensors path (a .json sidecar goes beside it)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fresh initialisation")


def main(args: argparse.Namespace) -> int:
    print(f"random-init twin of {args.model}: {write_twin(args.model, args.out, seed=args.seed)} (+ its .json sidecar)")
    return 0
