"""Recipes validate once, overrides reach any field, and bad keys fail naming key and file."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pretrain.config import ConfigError, PretrainConfig, TransferConfig, load_config, parse_overrides
from pretrain.models import build_model

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_overrides_are_parsed_as_yaml_values():
    assert parse_overrides(["train.steps=100", "optim.betas=[0.9,0.95]", "data.val_urls=null"]) == {
        "train": {"steps": 100}, "optim": {"betas": [0.9, 0.95]}, "data": {"val_urls": None}
    }
    with pytest.raises(ConfigError, match="key.sub=value"):
        parse_overrides(["train.steps"])


def test_override_changes_a_field():
    cfg = load_config(PretrainConfig, CONFIGS / "pretrain/demo_fmnist.yaml", ["train.steps=7", "engine.zero_stage=3"])
    assert cfg.train.steps == 7 and cfg.engine.zero_stage == 3


def test_unknown_key_names_the_key_and_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((CONFIGS / "pretrain/demo_fmnist.yaml").read_text().replace("  batch_size: 64", "  batch_sise: 64"))
    with pytest.raises(ConfigError) as err:
        load_config(PretrainConfig, bad)
    assert "data.batch_sise: unknown key" in str(err.value) and str(bad) in str(err.value)


def test_wrong_type_from_the_cli_fails_before_any_work():
    with pytest.raises(ConfigError, match=r"engine\.zero_stage"):
        load_config(PretrainConfig, CONFIGS / "pretrain/demo_fmnist.yaml", ["engine.zero_stage=4"])
    with pytest.raises(ConfigError, match=r"train\.steps"):
        load_config(PretrainConfig, CONFIGS / "pretrain/demo_fmnist.yaml", ["train.steps=many"])


def test_missing_file_says_where_recipes_live(tmp_path):
    with pytest.raises(ConfigError, match="configs/"):
        load_config(PretrainConfig, tmp_path / "nope.yaml")


@pytest.mark.parametrize("path", sorted((CONFIGS / "pretrain").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_pretrain_recipe_validates_and_builds_its_model_on_meta(path):
    cfg = load_config(PretrainConfig, path)
    with torch.device("meta"):
        model = build_model(cfg.model.name, num_classes=cfg.data.num_classes, **cfg.model.kwargs)
    assert sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.parametrize("path", sorted((CONFIGS / "transfer").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_transfer_recipe_validates(path):
    load_config(TransferConfig, path)
