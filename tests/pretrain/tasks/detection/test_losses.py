import math

import pytest
import torch

from pretrain.tasks.detection.losses import SetCriterion
from pretrain.tasks.detection.matcher import HungarianMatcher


def criterion(**weights) -> SetCriterion:
    return SetCriterion(num_classes=2, matcher=HungarianMatcher(), eos_coef=0.1, **weights)


def test_losses_of_hand_computed_boxes():
    # Target [0.5, 0.4, 0.7, 0.6] (xyxy); query 0 is [0.4, 0.4, 0.6, 0.6]: L1 = 0.1, intersection 0.02,
    # union 0.06, hull 0.06 -> GIoU = 1/3. Query 1 is far off and stays unmatched ("no object").
    outputs = {
        "logits": torch.tensor([[[2.0, 0.0, 0.0], [0.0, 0.0, 1.0]]]),
        "boxes": torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.1, 0.1, 0.1, 0.1]]]),
    }
    targets = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.6, 0.5, 0.2, 0.2]])}]

    total, metrics = criterion()(outputs, targets)

    ce_matched = -math.log(math.exp(2) / (math.exp(2) + 2))  # class 0, weight 1
    ce_empty = -math.log(math.e / (math.e + 2))  # no-object class, weight eos_coef
    ce = (ce_matched + 0.1 * ce_empty) / 1.1
    assert metrics["loss_ce"].item() == pytest.approx(ce, rel=1e-5)
    assert metrics["loss_bbox"].item() == pytest.approx(0.1, rel=1e-5)
    assert metrics["loss_giou"].item() == pytest.approx(2 / 3, rel=1e-5)
    assert total.item() == pytest.approx(ce + 5 * 0.1 + 2 * 2 / 3, rel=1e-5)


def test_disjoint_boxes_normalised_by_number_of_boxes():
    # Two targets, each met by one query. Pair A: [0, 0, .2, .2] vs [.4, 0, .6, .2]: IoU 0, hull 0.12,
    # union 0.08 -> GIoU -1/3, L1 0.4. Pair B is exact: GIoU 1, L1 0.
    outputs = {
        "logits": torch.tensor([[[9.0, 0.0, 0.0], [0.0, 9.0, 0.0]]]),
        "boxes": torch.tensor([[[0.5, 0.1, 0.2, 0.2], [0.7, 0.7, 0.2, 0.3]]]),
    }
    targets = [{"labels": torch.tensor([0, 1]), "boxes": torch.tensor([[0.1, 0.1, 0.2, 0.2], [0.7, 0.7, 0.2, 0.3]])}]

    _, metrics = criterion()(outputs, targets)

    assert metrics["loss_bbox"].item() == pytest.approx(0.4 / 2, rel=1e-5)
    assert metrics["loss_giou"].item() == pytest.approx((4 / 3 + 0) / 2, rel=1e-5)


def test_auxiliary_layers_add_their_losses_and_weights_apply():
    layer = {
        "logits": torch.tensor([[[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]]),
        "boxes": torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.2, 0.2, 0.1, 0.1]]]),
    }
    targets = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.6, 0.5, 0.2, 0.2]])}]
    single, metrics = criterion(ce_weight=0.0, bbox_weight=1.0, giou_weight=0.0)(layer, targets)
    assert single.item() == pytest.approx(0.1, rel=1e-5)  # only the L1 term
    with_aux, _ = criterion(ce_weight=0.0, bbox_weight=1.0, giou_weight=0.0)({**layer, "aux": [layer, layer]}, targets)
    assert with_aux.item() == pytest.approx(3 * 0.1, rel=1e-5)


def test_image_without_objects_trains_no_object_class():
    outputs = {"logits": torch.zeros(1, 3, 3, requires_grad=True), "boxes": torch.full((1, 3, 4), 0.5, requires_grad=True)}
    targets = [{"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}]
    total, metrics = criterion()(outputs, targets)
    assert metrics["loss_ce"].item() == pytest.approx(math.log(3), rel=1e-5)
    assert metrics["loss_bbox"].item() == 0 and metrics["loss_giou"].item() == 0
    total.backward()
    assert outputs["logits"].grad[0, :, 2].lt(0).all(), "gradient pushes every query towards no-object"
