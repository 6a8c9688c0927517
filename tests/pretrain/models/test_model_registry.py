"""The registry: paper parameter counts, forward/backward of every tiny variant, timm round trips."""
import json

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from pretrain.models import MODELS, build_model, export_spec


def _param_count(model: torch.nn.Module, skip: tuple[str, ...] = ()) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if not n.startswith(skip))


def _meta(name: str, **kwargs) -> torch.nn.Module:
    with torch.device("meta"):
        return build_model(name, num_classes=1000, img_size=224, **kwargs)


def _inputs(model: torch.nn.Module, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, *model.patch_embed.img_size)


@pytest.mark.parametrize("name", [n for n, s in MODELS.items() if s.paper_params_m])
def test_parameter_count_within_one_percent_of_paper(name):
    spec = MODELS[name]
    count = _param_count(_meta(name)) / 1e6
    assert abs(count - spec.paper_params_m) <= 0.01 * spec.paper_params_m, f"{name}: {count:.2f}M vs {spec.paper}"


@pytest.mark.parametrize("hybrid, vit, stages, feature_chans, grid", [
    ("r50_vit_b16", "vit_b16", [3, 4, 9], 1024, (14, 14)),
    ("r50_vit_l32", "vit_l16", [3, 4, 6, 3], 2048, (7, 7)),
])
def test_hybrid_is_r50_feature_map_cut_in_1x1_patches_under_the_vit(hybrid, vit, stages, feature_chans, grid):
    model, plain = _meta(hybrid), _meta(vit)
    embed = model.patch_embed
    assert [len(stage.blocks) for stage in embed.backbone.stages] == stages
    assert embed.feature_dim == feature_chans and embed.proj.kernel_size == (1, 1) and tuple(embed.grid_size) == grid
    # Above the stem the hybrid is exactly the ViT: same blocks, norm, head.
    body = _param_count(plain, skip=("patch_embed", "pos_embed"))
    assert _param_count(model, skip=("patch_embed", "pos_embed")) == body
    assert model.pos_embed.shape == (1, 1 + grid[0] * grid[1], plain.embed_dim)


def test_forward_backward_identical_with_checkpointing_and_blocks_recomputed(tiny_case):
    name, options = tiny_case
    torch.manual_seed(0)
    model = build_model(name, num_classes=5, **options)
    images, labels = _inputs(model), torch.tensor([1, 3])
    calls = {"n": 0}
    for block in model.blocks:
        # A pre-hook: recomputation stops early, once the saved tensors are back, so forward hooks miss it.
        block.register_forward_pre_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    grads, counts = [], []
    for checkpointing in (False, True):
        model.set_grad_checkpointing(checkpointing)
        model.zero_grad()
        calls["n"] = 0
        F.cross_entropy(model(images), labels).backward()
        counts.append(calls["n"])
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    names = {n for n, _ in model.named_parameters()}
    assert grads[0].keys() == names, f"parameters without gradient: {names - grads[0].keys()}"
    assert all(torch.isfinite(g).all() for g in grads[0].values())
    for key in names:
        torch.testing.assert_close(grads[1][key], grads[0][key], rtol=1e-4, atol=1e-6, msg=key)
    assert counts == [len(model.blocks), 2 * len(model.blocks)]  # checkpointed blocks run again in backward


def test_export_loads_into_timm_strict_with_same_logits(timm_backed_case, tmp_path):
    name, options = timm_backed_case
    model = build_model(name, num_classes=7, **options).eval()
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    spec = json.loads(json.dumps(export_spec(name, num_classes=7, **options)))  # as the JSON sidecar holds it
    twin = timm.create_model(spec["timm_name"], pretrained=False, **spec["timm_kwargs"]).eval()
    twin.load_state_dict(load_file(str(tmp_path / "w.safetensors")), strict=True)
    images = _inputs(model)
    with torch.no_grad():
        torch.testing.assert_close(twin(images), model(images), rtol=1e-5, atol=1e-5)


def test_models_timm_lacks_rebuild_from_their_state_dict(own_case):
    name, options = own_case
    model = build_model(name, num_classes=7, **options).eval()
    assert export_spec(name, num_classes=7, **options) == {"timm_name": None, "timm_kwargs": {}}
    twin = build_model(name, num_classes=7, **options).eval()
    twin.load_state_dict(model.state_dict(), strict=True)
    images = _inputs(model)
    with torch.no_grad():
        torch.testing.assert_close(twin(images), model(images))


def test_zero_head_starts_at_zero_and_still_learns():
    model = build_model("vit_demo", num_classes=4, zero_head=True)
    logits = model(_inputs(model))
    assert torch.count_nonzero(logits) == 0
    F.cross_entropy(logits, torch.tensor([0, 1])).backward()
    assert model.head.weight.grad.abs().sum() > 0
    assert "zero_head" not in export_spec("vit_demo", zero_head=True)["timm_kwargs"]


def test_vit_demo_keeps_its_shape():
    model = build_model("vit_demo", num_classes=10)
    assert (model.embed_dim, len(model.blocks), model.patch_embed.grid_size) == (96, 4, (7, 7))
    assert model(torch.randn(1, 3, 28, 28)).shape == (1, 10)


@pytest.mark.parametrize("name, options, error, words", [
    ("vit_nope", {}, KeyError, "known models"),
    ("vit_demo", dict(pos_embed="sinusoid"), ValueError, "choose one of"),
    ("vit_demo", dict(gpsa_blocks=2, pos_embed="2d"), ValueError, "gpsa_blocks"),
    ("vit_demo", dict(gpsa_blocks=2, class_token=False), ValueError, "global_pool='avg'"),
    ("vit_demo", dict(gpsa_blocks=4), ValueError, "global_pool='avg'"),
    ("vit_demo", dict(locality_strength=2.0), ValueError, "gpsa_blocks"),
    ("r_vit_demo", dict(pos_embed="rel"), ValueError, "hybrids"),
    ("pervit_demo", dict(no_such_arg=1), TypeError, "pervit_demo"),
])
def test_bad_choices_fail_with_a_clear_message(name, options, error, words):
    with pytest.raises(error, match=words):
        build_model(name, num_classes=3, **options)
