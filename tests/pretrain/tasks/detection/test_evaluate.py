import numpy as np
import pytest
import torch

from pretrain.tasks.detection.evaluate import coco_map, ground_truth, plot_predictions, postprocess
from pretrain.tasks.detection.data import pack_target


def truth(boxes, labels, size=(100, 100)):
    return {"boxes": np.array(boxes, dtype=float), "labels": np.array(labels), "size": size}


def pred(boxes, labels, scores):
    return {"boxes": np.array(boxes, dtype=float), "labels": np.array(labels), "scores": np.array(scores)}


def test_map_perfect_partial_and_wrong_class():
    truths = [truth([[10, 10, 30, 30], [50, 50, 40, 20]], [0, 1]), truth([[0, 0, 50, 50]], [0])]
    perfect = [pred(t["boxes"], t["labels"], [0.9] * len(t["labels"])) for t in truths]
    assert coco_map(perfect, truths, 2) == pytest.approx({"map": 1.0, "map_50": 1.0})

    # Each box shifted by a third of its width: IoU 0.5 exactly at the edge -> counted at .5 only partly.
    shifted = [pred([[14, 10, 30, 30], [58, 50, 40, 20]], [0, 1], [0.9, 0.9]), pred([[6, 0, 50, 50]], [0], [0.9])]
    partial = coco_map(shifted, truths, 2)
    assert partial["map_50"] == pytest.approx(1.0) and 0.2 < partial["map"] < 0.9

    wrong = [pred(t["boxes"], 1 - t["labels"], [0.9] * len(t["labels"])) for t in truths]
    assert coco_map(wrong, truths, 2) == {"map": 0.0, "map_50": 0.0}
    assert coco_map([pred(np.zeros((0, 4)), [], [])], [truth([[0, 0, 5, 5]], [0])], 1) == {"map": 0.0, "map_50": 0.0}


def test_postprocess_scales_to_original_pixels_and_ignores_no_object():
    logits = torch.tensor([[[0.0, 3.0, 9.0], [4.0, 0.0, 0.0]]])  # query 0 is mostly "no object"
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.25, 0.5, 0.5, 1.0]]])
    (out,) = postprocess(logits, boxes, torch.tensor([[200.0, 100.0]]))
    assert out["labels"].tolist() == [1, 0]
    assert out["scores"][0] < 0.01 < 0.9 < out["scores"][1]
    assert out["boxes"].flatten().tolist() == pytest.approx([80, 30, 40, 40, 0, 0, 100, 100])

    (gt,) = ground_truth(pack_target(torch.tensor([1]), boxes[0, :1], width=200, height=100, max_objects=3)[None])
    assert gt["boxes"].flatten().tolist() == pytest.approx([80, 30, 40, 40]) and gt["size"] == (200.0, 100.0)


def test_plot_predictions_writes_png(tmp_path):
    images = torch.zeros(3, 3, 32, 32)
    truths = [truth([[4, 4, 10, 10]], [0], size=(64, 64))] * 3
    preds = [pred([[4, 4, 10, 10], [20, 20, 5, 5]], [0, 0], [0.9, 0.1])] * 3
    path = plot_predictions(images, preds, truths, tmp_path / "p" / "pred.png", mean=(0.5,) * 3, std=(0.5,) * 3, class_names=["box"])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(tmp_path.glob("p/.*")) == []
