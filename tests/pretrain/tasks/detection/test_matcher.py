import itertools

import pytest
import torch

from pretrain.tasks.detection.matcher import HungarianMatcher, matching_cost


def random_boxes(generator: torch.Generator, n: int) -> torch.Tensor:
    centre = torch.rand(n, 2, generator=generator) * 0.6 + 0.2
    size = torch.rand(n, 2, generator=generator) * 0.3 + 0.05
    return torch.cat([centre, size], dim=-1)


def brute_force_cost(cost: torch.Tensor) -> float:
    """Least total cost over every injective assignment of targets (columns) to queries (rows)."""
    queries, targets = cost.shape
    return min(sum(cost[q, t].item() for t, q in enumerate(perm)) for perm in itertools.permutations(range(queries), targets))


@pytest.mark.parametrize("seed", range(12))
def test_matches_brute_force_minimum(seed):
    g = torch.Generator().manual_seed(seed)
    num_queries, num_classes = 5, 3
    num_targets = int(torch.randint(1, num_queries + 1, (), generator=g))
    logits = torch.randn(1, num_queries, num_classes + 1, generator=g)
    boxes = random_boxes(g, num_queries)[None]
    target = {"labels": torch.randint(0, num_classes, (num_targets,), generator=g), "boxes": random_boxes(g, num_targets)}
    weights = dict(cost_class=1.0, cost_bbox=5.0, cost_giou=2.0)

    (rows, cols), = HungarianMatcher(**weights)(logits, boxes, [target])

    cost = matching_cost(logits[0], boxes[0], target["labels"], target["boxes"], **weights)
    assert sorted(cols.tolist()) == list(range(num_targets)), "every target is matched once"
    assert len(set(rows.tolist())) == num_targets, "no query takes two targets"
    assert cost[rows, cols].sum().item() == pytest.approx(brute_force_cost(cost), abs=1e-5)


def test_cost_terms_prefer_the_right_query():
    # Query 1 sits on the target box and predicts its class: it must win whichever cost is used alone.
    logits = torch.tensor([[[0.0, 0.0, 0.0], [0.0, 5.0, 0.0]]])
    boxes = torch.tensor([[[0.2, 0.2, 0.1, 0.1], [0.7, 0.7, 0.2, 0.2]]])
    target = {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.7, 0.7, 0.2, 0.2]])}
    for weights in ({"cost_class": 1, "cost_bbox": 0, "cost_giou": 0}, {"cost_class": 0, "cost_bbox": 1, "cost_giou": 0},
                    {"cost_class": 0, "cost_bbox": 0, "cost_giou": 1}):
        (rows, cols), = HungarianMatcher(**weights)(logits, boxes, [target])
        assert rows.tolist() == [1] and cols.tolist() == [0], weights


def test_image_without_objects_matches_nothing():
    logits, boxes = torch.randn(2, 4, 3), torch.rand(2, 4, 4) * 0.5 + 0.25
    targets = [{"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)},
               {"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    matches = HungarianMatcher()(logits, boxes, targets)
    assert [len(r) for r, _ in matches] == [0, 1]


def test_all_zero_costs_rejected():
    with pytest.raises(ValueError, match="cannot all be 0"):
        HungarianMatcher(cost_class=0, cost_bbox=0, cost_giou=0)
