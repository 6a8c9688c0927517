"""MAE's training step against full-token steps of the same encoder.

One timm ViT (default ViT-L/16 at 224 px, the MAE recipe's) is wrapped three ways, all sharing
the same backbone module:
  mae          the MAE objective: 75 % masked, the encoder on the 49 visible tokens (+ class
               token), the recipe's decoder (8 blocks, 512 wide) on all 196 positions
  full_mae     the same objective with one patch masked: the encoder on 195 tokens, the same
               decoder (MAE's "encoder w/ [M]" baseline, Table 2, minus one token)
  supervised   softmax cross-entropy on the class token: the encoder on all 196 tokens, no decoder
Each step is forward + backward (mask draws, loss, gradients), timed in turns, `--repeats`
times after `--warmup` untimed rounds; medians are reported. The optimizer update is timed
apart (AdamW over the MAE objective's parameters): it does not depend on the token count and,
at the recipe's 4096 images a step, is spread over many images, while at this bench's small
batches it would hide the encoder's share. On CUDA: bf16 autocast, timings synchronised.

    python bench/mae_speedup.py [--model vit_l16] [--batch 2] [--repeats 5] [--warmup 1]

It also prints the ratio of the two steps' FLOPs (matmuls and convolutions), the speed-up a
compute-bound device would reach. Last line: RESULT mae_speedup=<full_mae / mae> mae_speedup_vs_supervised=<supervised / mae>
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.models import build_model  # noqa: E402
from pretrain.objectives import build_objective  # noqa: E402
from pretrain.engine.perf import train_flops_per_sample  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cuda = torch.cuda.is_available()
    parser.add_argument("--model", default="vit_l16")
    parser.add_argument("--batch", type=int, default=128 if cuda else 2)
    parser.add_argument("--repeats", type=int, default=20 if cuda else 5)
    parser.add_argument("--warmup", type=int, default=3 if cuda else 1)
    parser.add_argument("--decoder-dim", type=int, default=512)
    parser.add_argument("--decoder-depth", type=int, default=8)
    parser.add_argument("--decoder-heads", type=int, default=16)
    args = parser.parse_args()

    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    backbone = build_model(args.model, num_classes=1000).to(device)
    num_patches = backbone.patch_embed.num_patches
    decoder = dict(decoder_dim=args.decoder_dim, decoder_depth=args.decoder_depth, decoder_heads=args.decoder_heads)
    objectives = {
        "mae": build_objective("mae", backbone, mask_ratio=0.75, **decoder).to(device),
        "full_mae": build_objective("mae", backbone, mask_ratio=1 / num_patches, **decoder).to(device),
        "supervised": build_objective("softmax_xent", backbone).to(device),
    }
    size = backbone.patch_embed.img_size
    images = torch.randn(args.batch, 3, *size, device=device)
    labels = torch.randint(0, 1000, (args.batch,), device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()

    def step(objective) -> None:
        objective.zero_grad(set_to_none=True)
        with autocast:
            loss, _ = objective(images, labels)
        loss.backward()

    print(f"{args.model} {size[0]} px, {num_patches} patches, batch {args.batch}, device {device}, "
          f"decoder {args.decoder_depth}x{args.decoder_dim}, torch threads {torch.get_num_threads()}")
    times: dict[str, list[float]] = {name: [] for name in objectives}
    for round_ in range(args.warmup + args.repeats):
        for name, objective in objectives.items():
            elapsed = timed(lambda: step(objective), device)
            if round_ >= args.warmup:
                times[name].append(elapsed)
    medians = {name: statistics.median(t) for name, t in times.items()}
    for name, t in times.items():
        print(f"{name:11s} median {medians[name] * 1e3:9.1f} ms  (min {min(t) * 1e3:.1f}, max {max(t) * 1e3:.1f}, n={len(t)})")

    mae = objectives["mae"]
    optimizer = torch.optim.AdamW(mae.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
    step(mae)
    update = statistics.median(timed(optimizer.step, device) for _ in range(3))
    print(f"optimizer  median {update * 1e3:9.1f} ms  (AdamW over {sum(p.numel() for p in mae.parameters()) / 1e6:.0f} M "
          "parameters, the same for every objective)")
    # The ceiling a compute-bound device can reach: the ratio of the steps' matmul FLOPs.
    flops = {name: train_flops_per_sample(objectives[name], size[0]) for name in ("mae", "full_mae")}
    print(f"FLOPs per image and step: mae {flops['mae'] / 1e9:.1f} G, full_mae {flops['full_mae'] / 1e9:.1f} G "
          f"(ratio {flops['full_mae'] / flops['mae']:.2f}, the speed-up of a compute-bound step)")
    print(f"RESULT mae_speedup={medians['full_mae'] / medians['mae']:.2f} "
          f"mae_speedup_vs_supervised={medians['supervised'] / medians['mae']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
