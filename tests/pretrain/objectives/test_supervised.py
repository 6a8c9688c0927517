"""Supervised objectives on hard labels, mixup's soft targets and JFT-style multi-hot targets."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from data_pipeline.decode import build_mixup
from pretrain.objectives import build_objective


class FixedLogits(nn.Module):
    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits


LOGITS = torch.tensor([[3.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])


def test_softmax_xent_on_class_indices():
    targets = torch.tensor([0, 1, 0, 2])
    loss, metrics = build_objective("softmax_xent", FixedLogits(LOGITS))(torch.zeros(4, 3, 8, 8), targets)
    assert loss.item() == pytest.approx(F.cross_entropy(LOGITS, targets).item())
    assert metrics["accuracy"].item() == pytest.approx(0.5)


def test_softmax_xent_on_mixup_soft_targets_scores_the_dominant_class():
    mixup = build_mixup(mixup_alpha=0.8, cutmix_alpha=0.0, prob=1.0, switch_prob=0.0, label_smoothing=0.0,
                        num_classes=3, multi_label=False)
    _, soft = mixup(torch.zeros(4, 3, 8, 8), torch.tensor([0, 1, 0, 2]))
    assert soft.shape == (4, 3)
    loss, metrics = build_objective("softmax_xent", FixedLogits(LOGITS))(torch.zeros(4, 3, 8, 8), soft)
    assert loss.item() == pytest.approx(-(soft * LOGITS.log_softmax(-1)).sum(-1).mean().item(), rel=1e-6)
    expected = (LOGITS.argmax(-1) == soft.argmax(-1)).float().mean()
    assert metrics["accuracy"].item() == pytest.approx(expected.item())


def test_sigmoid_xent_sums_over_classes_and_scores_precision_at_1():
    multi_hot = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 0.0, 1.0]])
    loss, metrics = build_objective("sigmoid_xent", FixedLogits(LOGITS))(torch.zeros(4, 3, 8, 8), multi_hot)
    expected = F.binary_cross_entropy_with_logits(LOGITS, multi_hot, reduction="sum") / 4
    assert loss.item() == pytest.approx(expected.item())
    assert metrics["accuracy"].item() == pytest.approx(0.75)  # the top class of rows 0, 2, 3 is a true label
