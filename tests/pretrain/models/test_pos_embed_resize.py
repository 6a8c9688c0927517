"""Weights carried to a new resolution or patch size, for every position-embedding kind."""
import pytest
import torch
from timm.layers import resample_abs_pos_embed, resample_patch_embed

from pretrain.models import build_model
from pretrain.models.posembed import resize_pos_embed_in_state_dict
from pretrain.models.vit import axial_pos_grid
from pretrain.checkpoint.weights import build_from_state_dict


def _resized(options: dict, new_img_size: int = 44, **extra):
    model = build_model("vit_demo", num_classes=5, **options)
    state = model.state_dict()
    return state, resize_pos_embed_in_state_dict(state, model_name="vit_demo", old_img_size=28,
                                                 new_img_size=new_img_size, **options, **extra)


@pytest.mark.parametrize("options, prefix", [({}, 1), (dict(class_token=False), 0), (dict(gpsa_blocks=2), 0)])
def test_learned_1d_agrees_with_timm_and_keeps_prefix_tokens(options, prefix):
    state, resized = _resized(options)
    expected = resample_abs_pos_embed(state["pos_embed"], [11, 11], old_size=[7, 7], num_prefix_tokens=prefix)
    assert torch.equal(resized["pos_embed"], expected) and resized["pos_embed"].shape[1] == prefix + 121
    assert torch.equal(resized["pos_embed"][:, :prefix], state["pos_embed"][:, :prefix])
    assert all(torch.equal(resized[k], v) for k, v in state.items() if k != "pos_embed")


def test_2d_halves_resampled_like_the_full_grid():
    """Resampling the x/y tables equals timm's 2-D resampling of the grid they make (bicubic is separable)."""
    state, resized = _resized(dict(pos_embed="2d"))
    expected = resample_abs_pos_embed(axial_pos_grid(state["pos_embed_h"], state["pos_embed_w"]), [11, 11],
                                      old_size=[7, 7], num_prefix_tokens=0)
    got = axial_pos_grid(resized["pos_embed_h"], resized["pos_embed_w"])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)  # every cell, not only the row/column read back


def test_relative_bias_tables_resized_class_entries_kept():
    key = "blocks.1.attn.rel_pos.relative_position_bias_table"
    model = build_model("vit_demo", num_classes=5, pos_embed="rel")
    with torch.no_grad():
        model.get_parameter(key).normal_()  # a trained-scale table
    state = model.state_dict()
    resized = resize_pos_embed_in_state_dict(state, model_name="vit_demo", old_img_size=28, new_img_size=44, pos_embed="rel")
    assert resized[key].shape == ((2 * 11 - 1) ** 2 + 3, 3)
    torch.testing.assert_close(resized[key][-3:], state[key][-3:])  # class<->token entries
    centre_old, centre_new = (13 * 13) // 2, (21 * 21) // 2  # offset (0, 0) sits mid-table
    torch.testing.assert_close(resized[key][centre_new], state[key][centre_old])


def test_new_patch_size_resamples_patch_embedding_with_timm():
    state, resized = _resized({}, new_img_size=32, new_patch_size=8)
    assert torch.equal(resized["patch_embed.proj.weight"], resample_patch_embed(state["patch_embed.proj.weight"], [8, 8]))
    assert resized["pos_embed"].shape == (1, 1 + 16, 96)


def test_same_size_changes_nothing():
    state, resized = _resized(dict(pos_embed="2d"), new_img_size=28)
    assert all(torch.equal(resized[k], v) for k, v in state.items())


@pytest.mark.parametrize("options", [{}, dict(pos_embed="2d"), dict(pos_embed="rel"), dict(pos_embed="none"),
                                     dict(gpsa_blocks=2), dict(pre_logits_size=32)])
def test_build_at_384_style_size_for_finetuning(options):
    trained = build_model("vit_demo", num_classes=5, **options)
    model = build_from_state_dict("vit_demo", trained.state_dict(), num_classes=3, old_img_size=28, img_size=56, **options)
    assert model.patch_embed.grid_size == (14, 14)
    assert torch.count_nonzero(model.head.weight) == 0 and model.head.in_features == 96  # fresh zero head, no tanh layer
    assert torch.equal(model.state_dict()["blocks.3.mlp.fc2.weight"], trained.state_dict()["blocks.3.mlp.fc2.weight"])
    assert model(torch.randn(1, 3, 56, 56)).shape == (1, 3)


@pytest.mark.parametrize("name, old, new", [("r_vit_demo", 32, 64), ("pervit_demo", 64, 96)])
def test_hybrid_and_pervit_keep_every_weight(name, old, new):
    trained = build_model(name, num_classes=5)
    model = build_from_state_dict(name, trained.state_dict(), num_classes=5, old_img_size=old, img_size=new, new_head=False)
    for key, value in trained.state_dict().items():
        if key != "pos_embed":
            assert torch.equal(model.state_dict()[key], value), key
    assert model(torch.randn(1, 3, new, new)).shape == (1, 5)


def test_weights_of_another_shape_fail_naming_the_tensor():
    state = build_model("vit_demo", num_classes=5, mlp_ratio=2.0).state_dict()
    with pytest.raises(ValueError, match="blocks.0.mlp.fc1.weight"):
        resize_pos_embed_in_state_dict(state, model_name="vit_demo", old_img_size=28, new_img_size=56)


@pytest.mark.parametrize("options", [{}, dict(pos_embed="2d"), dict(pos_embed="rel"), dict(gpsa_blocks=2)])
def test_set_input_size_agrees_with_the_state_dict_path(options):
    """Detection resizes a built model in place; both routes give the same weights."""
    state, resized = _resized(options)
    model = build_model("vit_demo", num_classes=5, **options)
    model.load_state_dict(state)
    model.set_input_size(img_size=(44, 44))
    assert model.patch_embed.grid_size == (11, 11)
    for key, value in resized.items():
        torch.testing.assert_close(model.state_dict()[key], value, msg=key)
