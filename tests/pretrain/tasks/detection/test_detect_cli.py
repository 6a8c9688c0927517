"""The real `python -m pretrain detect` on generated shapes: it learns, logs, checkpoints, resumes, exports."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from data_pipeline import storage
from pretrain.tasks.detection.config import CocoSource, DetectConfig
from pretrain.tasks.detection.data import DetectionTransform, eval_loader
from pretrain.tasks.detection.evaluate import coco_map, predict
from pretrain.tasks.detection.export import load_detector
from pretrain.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[4]
TINY = REPO / "configs" / "detect" / "shapes_tiny.yaml"


def detect(tmp: Path, *overrides: str) -> subprocess.CompletedProcess:
    # One intra-op thread: tiny models gain nothing from more, and on a busy machine spinning workers cost a lot.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    args = [f"data.train.dir={tmp / 'shapes_train'}", f"data.val.dir={tmp / 'shapes_val'}",
            f"tracking.tracking_uri=sqlite:///{tmp / 'mlflow.db'}", *overrides]
    result = subprocess.run([sys.executable, "-m", "pretrain", "detect", "--config", str(TINY), *args],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def test_short_run_learns_to_detect_shapes(tmp_path):
    out = tmp_path / "run"
    detect(tmp_path, f"train.output_dir={out}")

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["val_map_50_at_start"] < 0.05
    assert metrics["val_map_50"] > max(0.3, 10 * metrics["val_map_50_at_start"]), metrics

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("vitscale-detect").experiment_id])
    assert run.data.tags["stage"] == "detect"
    assert run.data.metrics["val_map_50"] == pytest.approx(metrics["val_map_50"])
    assert {"val_map", "loss_ce", "loss_bbox", "loss_giou"} <= run.data.metrics.keys()
    pngs = [a.path for a in client.list_artifacts(run.info.run_id, "predictions")]
    assert len(pngs) == 1 and pngs[0].endswith(".png")
    assert {a.path for a in client.list_artifacts(run.info.run_id, "detector")} == {"detector/detector.safetensors", "detector/detector.json"}

    # The exported detector, rebuilt from its sidecar alone, scores what the run logged.
    detector, meta = load_detector(out / "export" / "detector.safetensors")
    cfg = DetectConfig.model_validate(meta["config"])
    source = CocoSource(annotations=str(tmp_path / "shapes_val" / "annotations.json"), images=str(tmp_path / "shapes_val" / "images"))
    loader = eval_loader(source, transform=DetectionTransform(cfg.data.image_size, meta["mean"], meta["std"]),
                         num_classes=1, max_objects=cfg.data.max_objects, batch_size=32, rank=0, world_size=1, num_workers=0)
    predictions, truths, _ = predict(detector, loader, device=torch.device("cpu"), progress=False)
    assert coco_map(predictions, truths, 1)["map_50"] == pytest.approx(metrics["val_map_50"], abs=1e-4)


def test_frozen_backbone_with_ema_checkpoints_to_s3_and_resumes_on_a_fresh_folder(tmp_path, one_process_group, s3_server,
                                                                                   monkeypatch):
    from pretrain.tasks.detection.run import build_objective, run

    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    out, fresh = tmp_path / "run", tmp_path / "fresh"
    uri = f"s3://{s3_server.create_bucket('detect')}/run"
    overrides = ["train.ckpt_every=2", "train.keep_last=3", "backbone.freeze_steps=2", "train.ema.decay=0.5",
                 f"train.remote_uri={uri}", f"data.train.dir={tmp_path / 'shapes_train'}", f"data.val.dir={tmp_path / 'shapes_val'}",
                 "data.train.num_images=32", "data.val.num_images=8", "data.num_workers=0", "train.eval_at_start=false",
                 "train.plot_images=0", f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    run(load_config(DetectConfig, TINY, [*overrides, f"train.output_dir={out}", "train.steps=4"]), one_process_group)
    mirrored = storage.list_keys(f"{uri}/checkpoints")
    assert {"latest", "step00000004/ema.json", "step00000004/ema_rank00000.safetensors", "step00000004/meta.json"} <= mirrored.keys()

    def weights(tag):  # ZeRO-1 keeps whole weights in the model-states file
        return torch.load(out / "checkpoints" / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)["module"]

    cfg = load_config(DetectConfig, TINY, overrides)
    torch.manual_seed(cfg.train.seed)
    initial = build_objective(cfg)[0].state_dict()
    at2, at4 = weights("step00000002"), weights("step00000004")
    backbone = [k for k in initial if k.startswith("detector.backbone.")]
    head = [k for k in initial if k.startswith("detector.head.")]
    assert all(torch.equal(at2[k], initial[k]) for k in backbone), "backbone frozen for the first 2 steps"
    assert any(not torch.equal(at2[k], initial[k]) for k in head), "head trained meanwhile"
    assert any(not torch.equal(at4[k], at2[k]) for k in backbone), "backbone trained after step 2"

    meta = json.loads((out / "checkpoints" / "step00000004" / "meta.json").read_text())
    assert meta["data"]["taken"] == 0 and meta["data"]["epoch"] == 2, "32 images = 2 batches an epoch"
    # a machine without the run's folder: the checkpoint (weights, optimizer, EMA, data position) comes from S3
    results = run(load_config(DetectConfig, TINY, [*overrides, f"train.output_dir={fresh}", "train.steps=6",
                                                   "train.resume=true"]), one_process_group)
    assert (fresh / "checkpoints" / "latest").read_text() == "step00000006"
    assert json.loads((fresh / "checkpoints" / "step00000006" / "ema.json").read_text())["updates"] == 6  # resumed, not restarted
    assert {"val_map", "val_map_50", "loss"} <= results.keys()
    assert storage.read_text(f"{uri}/checkpoints/latest") == "step00000006"
    assert {"detector.safetensors", "detector.json"} <= storage.list_keys(f"{uri}/export").keys()
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (logged,) = client.search_runs([client.get_experiment_by_name("vitscale-detect").experiment_id])
    assert [m.step for m in client.get_metric_history(logged.info.run_id, "val_map_50")] == [4, 6], \
        "the resumed run continues the same MLflow run"


def test_bad_recipe_fails_before_any_work():
    from pretrain.__main__ import main

    with pytest.raises(ConfigError) as err:
        main(["detect", "--config", str(TINY), "head.num_heads=5", "loss.bogus=1", "backbone.checkpoint=x.safetensors"])
    message = str(err.value)
    assert "head.d_model=64 must divide by head.num_heads=5" in message
    assert "loss.bogus: unknown key" in message
    assert "exactly one of backbone.checkpoint" in message
