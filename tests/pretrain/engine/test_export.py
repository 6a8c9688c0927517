"""Exports from every ZeRO stage, bf16, the EMA, and from S3 to S3."""
from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import load_file

from data_pipeline import storage
from pretrain.checkpoint.export import consolidated_state_dict, export_checkpoint, load_exported, weights_source
from tests.pretrain.engine.conftest import STEPS

TAG = f"step{STEPS:08d}"


def exported(runs, name, file="model.safetensors"):
    return load_file(runs.out(name) / "export" / file)


@pytest.mark.parametrize("name", ["zero0", "zero1", "zero2", "zero3"])
def test_every_stage_exports_the_same_model_loadable_by_timm(runs, single_run, zero_runs, name):
    weights = exported(runs, name)
    reference = exported(runs, "single")  # ZeRO-2 on one rank, same training
    assert sorted(weights) == sorted(reference)
    for key, value in weights.items():
        assert value.dtype == torch.float32
        # atol: the attention's key bias has a zero gradient up to rounding, which Adam scales
        # into steps of up to lr; everything else agrees to float rounding
        torch.testing.assert_close(value, reference[key], rtol=1e-4, atol=1e-4, msg=key)
    _, meta = load_exported(runs.out(name) / "export" / "model.safetensors")
    model = timm.create_model(meta["timm_name"], pretrained=False, **meta["timm_kwargs"])
    model.load_state_dict(weights, strict=True)


def test_model_states_read_equals_the_fp32_master(runs, zero_runs):
    """The cheap read (module weights, memory-mapped, weights_only) is exact where it is chosen."""
    assert weights_source(zero_stage=2, precision="fp32", dtype=torch.float32, weights="model") == "model_states"
    assert weights_source(zero_stage=2, precision="bf16", dtype=torch.float32, weights="model") == "zero_to_fp32"
    assert weights_source(zero_stage=3, precision="fp32", dtype=torch.bfloat16, weights="model") == "zero_to_fp32"
    folder = runs.out("zero2") / "checkpoints" / TAG
    cheap, master = consolidated_state_dict(folder, "model_states"), consolidated_state_dict(folder, "zero_to_fp32")
    assert cheap.keys() == master.keys()
    for key in master:
        torch.testing.assert_close(cheap[key], master[key], rtol=0, atol=0, msg=key)
    # bf16 run: its module holds the bf16 rounding of the fp32 master, exactly
    folder = runs.out("bf16") / "checkpoints" / TAG
    cheap, master = consolidated_state_dict(folder, "model_states"), consolidated_state_dict(folder, "zero_to_fp32")
    for key in master:
        assert cheap[key].dtype == torch.bfloat16
        torch.testing.assert_close(cheap[key], master[key].to(torch.bfloat16), rtol=0, atol=0, msg=key)


def test_bf16_export_and_fp32_export_of_a_bf16_run(runs, zero_runs, tmp_path):
    fp32 = export_checkpoint(runs.out("bf16") / "checkpoints", tmp_path / "fp32.safetensors")
    bf16 = export_checkpoint(runs.out("bf16") / "checkpoints", tmp_path / "bf16.safetensors", dtype=torch.bfloat16)
    full, half = load_file(fp32), load_file(bf16)
    for key in full:
        assert full[key].dtype == torch.float32 and half[key].dtype == torch.bfloat16
        torch.testing.assert_close(half[key], full[key].to(torch.bfloat16), rtol=0, atol=0)
    assert any((full[k] != full[k].to(torch.bfloat16).float()).any() for k in full)  # the fp32 master, not bf16 values


def test_ema_export_differs_from_the_model_and_loads(runs, zero_runs):
    model, ema = exported(runs, "zero2"), exported(runs, "zero2", "model_ema.safetensors")
    assert sorted(ema) == sorted(model)
    # decay 0.9 over 10 steps with warmup: a real average, between start and end weights
    assert all(torch.isfinite(v).all() for v in ema.values())
    assert sum((ema[k] - model[k]).abs().sum() for k in model) > 0
    net, meta = load_exported(runs.out("zero2") / "export" / "model_ema.safetensors")
    assert meta["weights"] == "ema"


def test_export_from_s3_to_s3(runs, single_run, s3_server, monkeypatch, tmp_path):
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)  # storage's client is made for these settings
    uri = f"s3://{runs.bucket}/single"
    stored = storage.list_keys(f"{uri}/checkpoints")
    assert storage.read_text(f"{uri}/checkpoints/latest") == TAG
    local = runs.out("single") / "checkpoints" / TAG
    for path in local.iterdir():  # the trainer mirrored the finished checkpoint file by file
        assert stored[f"{TAG}/{path.name}"] == (path.stat().st_size, storage.local_etag(path))
    assert {k.split("/")[0] for k in stored} == {"latest", "step00000005", TAG}
    assert {"export/model.safetensors", "export/model.json"} <= set(storage.list_keys(uri))

    out = export_checkpoint(f"{uri}/checkpoints", f"s3://{runs.bucket}/exports/single.safetensors", dtype=torch.bfloat16)
    assert out == f"s3://{runs.bucket}/exports/single.safetensors"
    storage.download_file(out, tmp_path / "single.safetensors")
    storage.download_file(f"s3://{runs.bucket}/exports/single.json", tmp_path / "single.json")
    model, meta = load_exported(tmp_path / "single.safetensors")
    assert meta["step"] == STEPS and meta["run_id"] == runs.run_id("single")
    for key, value in exported(runs, "single").items():
        torch.testing.assert_close(model.state_dict()[key], value.to(torch.bfloat16).float(), rtol=0, atol=0)
