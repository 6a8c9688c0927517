"""`python -m pretrain analyze` on a tiny exported model and real shards: PNGs, JSON, MLflow run."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from data_pipeline.sample import Sample
from data_pipeline.writer import write_split
from pretrain.__main__ import main
from pretrain.checkpoint.export import save_exported
from pretrain.models import build_model


def png(seed: int) -> bytes:
    """A 28 px image: a bright square on a dark background, somewhere different each time."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 40, (28, 28, 3), dtype=np.uint8)
    r, c = rng.integers(0, 18, 2)
    img[r : r + 10, c : c + 10] = 220
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("analyze")
    write_split((Sample(f"img_{i:03d}", png(i), "png", i % 3) for i in range(12)), root / "shards",
                prefix="val", split="val", samples_per_shard=6)
    model = build_model("vit_demo", num_classes=3)
    meta = {"model": "vit_demo", "num_classes": 3, "image_size": 28, "mean": [0.5] * 3, "std": [0.5] * 3, "run_id": None, "step": 0}
    weights = save_exported(model.state_dict(), root / "vit_demo.safetensors", meta)
    return root, weights, str(root / "shards" / "val-{000000..000001}.tar")


def test_analyze_writes_figures_numbers_and_an_mlflow_run(setup):
    root, weights, shards = setup
    uri = f"sqlite:///{root}/mlflow.db"
    out = root / "out"
    rc = main(["analyze", "--model", str(weights), "--data", shards, "--compare", "timm:resnet50",
               "--num-images", "10", "--batch-size", "4", "--rollout-images", "4",
               "--out", str(out), "--tracking-uri", uri, "--experiment", "analysis-test"])
    assert rc == 0
    pngs = ["attention_distance.png", "cka_vit_demo.png", "cka_vit_demo_vs_resnet50.png", "attention_rollout.png"]
    for name in pngs:
        with Image.open(out / name) as img:
            assert img.format == "PNG" and img.width > 100 and img.height > 100

    report = json.loads((out / "analysis.json").read_text())
    assert report["cka_estimator"] == "minibatch"
    assert report["num_images"] == 10  # a last batch of 2 is analysed too (CKA leaves it out)
    assert report["attention_distance"]["layers"] == [f"blocks.{i}.attn" for i in range(4)]
    distances = np.array(report["attention_distance"]["pixels"])
    assert distances.shape == (4, 3) and (distances > 0).all() and (distances < 28 * 2**0.5).all()
    cka = np.array(report["cka"]["matrix"])
    assert cka.shape == (4, 4) and np.allclose(np.diag(cka), 1)
    cross = report["cka_cross"]
    assert cross["reference"] == "resnet50" and len(cross["reference_layers"]) == 17  # stem + 16 bottlenecks
    assert np.array(cross["matrix"]).shape == (4, 17)

    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("analysis-test").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["num_images"] == "10"
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "analysis")}
    assert logged == {f"analysis/{n}" for n in pngs + ["analysis.json"]}
    history = client.get_metric_history(run.info.run_id, "attention_distance/mean")
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == [1, 2, 3, 4]
    np.testing.assert_allclose([m.value for m in sorted(history, key=lambda m: m.step)], distances.mean(1))


def test_analyze_names_what_is_wrong(setup):
    root, weights, shards = setup
    common = ["--data", shards, "--out", str(root / "bad"), "--no-tracking"]
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        main(["analyze", "--model", str(root / "missing.safetensors"), *common])
    with pytest.raises(ValueError, match="timm has no model 'resnet_nope'"):
        main(["analyze", "--model", str(weights), "--compare", "timm:resnet_nope", *common])
    with pytest.raises(ValueError, match="--batch-size must be at least 4|--num-images and --batch-size"):
        main(["analyze", "--model", str(weights), "--batch-size", "2", *common])
    with pytest.raises(FileNotFoundError, match=r"val-0000\d\d.tar does not exist"):
        main(["analyze", "--model", str(weights), "--data", shards.replace("000001", "000009"), "--no-tracking",
              "--out", str(root / "bad")])
