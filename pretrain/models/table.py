"""Print the model table (name, parameters, forward GFLOPs per image at 224 px) as Markdown.

    python -m pretrain.models.table [--img-size 224] [--num-classes 1000]

Everything is built on the meta device: no memory, a few seconds.
"""
from __future__ import annotations

import argparse

import torch

from pretrain.models.flops import flops_per_image
from pretrain.models.registry import MODELS, build_model, export_spec


def model_rows(img_size: int, num_classes: int) -> list[dict]:
    rows = []
    for name, spec in MODELS.items():
        if spec.tiny:
            continue
        with torch.device("meta"):
            model = build_model(name, num_classes=num_classes, img_size=img_size)
        flops = flops_per_image(name, img_size, num_classes=num_classes)
        rows.append(dict(
            name=name,
            params_m=sum(p.numel() for p in model.parameters()) / 1e6,
            paper_m=spec.paper_params_m,
            gflops=flops / 1e9,
            timm_name=export_spec(name)["timm_name"] or "-",
        ))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--num-classes", type=int, default=1000)
    args = parser.parse_args(argv)
    print(f"| model | params (M) | paper (M) | GFLOPs/img @{args.img_size} (forward, 2 per MAC) | timm architecture |")
    print("|---|---:|---:|---:|---|")
    for row in model_rows(args.img_size, args.num_classes):
        paper = f"{row['paper_m']:g}" if row["paper_m"] else "-"
        print(f"| {row['name']} | {row['params_m']:.1f} | {paper} | {row['gflops']:.1f} | {row['timm_name']} |")


if __name__ == "__main__":
    main()
