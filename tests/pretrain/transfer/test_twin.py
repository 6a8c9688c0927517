"""The random-init twin: the baseline every pretrained row of the demo stands beside."""
from __future__ import annotations

import json

import torch

from pretrain.__main__ import main as cli
from pretrain.checkpoint.weights import load_exported
from tests.pretrain.transfer.conftest import export_tiny_model


def test_twin_has_the_architecture_and_sidecar_but_fresh_weights(tmp_path):
    exported = export_tiny_model(tmp_path / "pre" / "model.safetensors", seed=3, global_pool="avg")
    assert cli(["twin", "--model", str(exported), "--out", str(tmp_path / "twin" / "model.safetensors")]) == 0
    pre, pre_meta = load_exported(exported)
    twin, twin_meta = load_exported(tmp_path / "twin" / "model.safetensors")
    for key in ("model", "model_kwargs", "num_classes", "image_size", "mean", "std", "timm_name", "timm_kwargs"):
        assert twin_meta[key] == pre_meta[key], key
    assert twin_meta["run_id"] is None and twin_meta["step"] == 0
    pre_state, twin_state = pre.state_dict(), twin.state_dict()
    assert pre_state.keys() == twin_state.keys()
    assert not torch.equal(pre_state["blocks.0.attn.qkv.weight"], twin_state["blocks.0.attn.qkv.weight"])
    # The model's own initialisation, not noise of another scale: timm's trunc-normal std 0.02.
    assert abs(twin_state["blocks.0.attn.qkv.weight"].std().item() - 0.02) < 0.003


def test_twin_is_seeded(tmp_path):
    exported = export_tiny_model(tmp_path / "pre" / "model.safetensors")
    for name in ("a", "b"):
        cli(["twin", "--model", str(exported), "--out", str(tmp_path / name / "model.safetensors"), "--seed", "5"])
    a, b = (load_exported(tmp_path / n / "model.safetensors")[0].state_dict() for n in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "a" / "model.json").read_text())["init_seed"] == 5
