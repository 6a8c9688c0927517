"""FLOPs per image: counted on the meta device, checked against the closed-form count."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from pretrain.models import build_model
from pretrain.models.flops import flops_per_image


def _vit_flops(img: int, patch: int, dim: int, depth: int, classes: int = 1000) -> int:
    """2 x multiply-adds of a ViT with a class token: patch projection, blocks, head."""
    patches = (img // patch) ** 2
    tokens = patches + 1
    block = 12 * tokens * dim**2 + 2 * tokens**2 * dim  # qkv, proj, MLP (4x); QK^T and AV
    return 2 * (patches * 3 * patch**2 * dim + depth * block + dim * classes)


@pytest.mark.parametrize("img", [224, 384])
def test_vit_b16_matches_the_closed_form(img):
    assert flops_per_image("vit_b16", img) == _vit_flops(img, 16, 768, 12)


def test_built_model_counts_the_same_and_is_left_untouched():
    model = build_model("pervit_demo", num_classes=1000)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert flops_per_image(model, 64) == flops_per_image("pervit_demo", 64)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())  # BN statistics included


def test_pervit_leaves_out_the_position_mlp_shared_by_the_batch():
    with torch.device("meta"):
        model = build_model("pervit_demo", num_classes=1000)
    counts = []
    for batch in (1, 3):
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(torch.empty(batch, 3, 64, 64, device="meta"))
        counts.append(counter.get_total_flops())
    per_image = flops_per_image("pervit_demo", 64)
    assert counts[1] - counts[0] == 2 * per_image
    g, channels, heads, blocks = 4, 8, 2, 4  # 64 px / 16; 4 distance channels per head
    shared = 2 * g * g * (g + 4) ** 2 * channels  # distance embedding Linear(1, channels)
    shared += blocks * 2 * g * g * (channels * channels * 9 * (g + 2) ** 2 + channels * heads * 9 * g * g)
    assert counts[0] - per_image == shared
