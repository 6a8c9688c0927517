"""Model FLOPs utilisation: the FLOPs a step needs over what the devices could do.

MFU counts 3x the forward FLOPs per sample (forward, and a backward of twice the cost), as
the PaLM paper defines it; recomputation under activation checkpointing is not counted.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from pretrain.models.flops import flops_per_image

# Dense peak FLOP/s per device from the vendors' data sheets (no sparsity): (bf16, fp32).
# fp32 is the non-tensor-core rate, which torch uses unless TF32 is switched on.
PEAK_FLOPS: dict[str, tuple[float, float]] = {
    "B200": (2.25e15, 80e12),
    "H200": (989e12, 67e12),
    "H100 PCIe": (756e12, 51e12),
    "H100": (989e12, 67e12),  # SXM
    "GH200": (989e12, 67e12),
    "A100": (312e12, 19.5e12),
    "A10G": (70e12, 31.2e12),
    "L40S": (362e12, 91.6e12),
    "L4": (121e12, 30.3e12),
    "MI300X": (1.307e15, 163.4e12),
    "MI250X": (383e12, 47.9e12),
}


def device_peak_flops(device: torch.device, precision: str) -> float | None:
    """The table's entry for the device's name (longest match), or None (CPUs, unknown GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    matches = [key for key in PEAK_FLOPS if key in name]
    if not matches:
        return None
    bf16, fp32 = PEAK_FLOPS[max(matches, key=len)]
    return bf16 if precision == "bf16" else fp32


def train_flops_per_sample(objective: nn.Module, image_size: int) -> float:
    """3x the forward FLOPs of one sample: the objective's own count when it defines
    `flops_per_image(image_size)` (MAE encodes a quarter of the patches), else its backbone's."""
    own = getattr(objective, "flops_per_image", None)
    forward = own(image_size) if callable(own) else flops_per_image(objective.backbone, image_size)
    return 3.0 * forward


def mfu(samples_per_s: float, flops_per_sample: float, *, world_size: int, peak_flops: float) -> float:
    return samples_per_s * flops_per_sample / (world_size * peak_flops)


def fused_attention(module: nn.Module) -> bool:
    """Whether every attention layer of `module` runs torch's fused scaled_dot_product_attention
    (timm's `fused_attn` flag: flash / memory-efficient kernels on GPUs) rather than softmax(QK^T)V."""
    flags = [m.fused_attn for m in module.modules() if hasattr(m, "fused_attn")]
    return bool(flags) and all(flags)
