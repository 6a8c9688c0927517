"""Per-sample seeded draws (what makes masks reproducible and resume exact) and patchify."""
from __future__ import annotations

import torch

from pretrain.objectives.patches import SampleDraws, patchify, unpatchify


def images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 28, 28, generator=torch.Generator().manual_seed(seed))


def test_a_sample_draws_the_same_wherever_it_sits_in_a_batch():
    draws = SampleDraws(seed=0).eval()
    a, b = images(4, 0), images(4, 1)
    first = draws(a, (49,))
    mixed = draws(torch.cat([b[:2], a[2:3], b[2:], a[:1]]), (49,))
    torch.testing.assert_close(mixed[2], first[2], rtol=0, atol=0)
    torch.testing.assert_close(mixed[-1], first[0], rtol=0, atol=0)
    assert not torch.equal(first[0], first[1])  # different samples, different draws
    assert not torch.equal(first, SampleDraws(seed=1).eval()(a, (49,)))  # the seed matters


def test_training_draws_advance_a_checkpointed_counter_and_evaluation_draws_do_not():
    draws = SampleDraws(seed=0)
    x = images(3, 0)
    first, second = draws(x, (49,)), draws(x, (49,))
    assert not torch.equal(first, second)  # a new mask every time the sample comes back
    assert draws.state_dict()["count"].item() == 2

    resumed = SampleDraws(seed=0)
    resumed.load_state_dict({"count": torch.tensor(1)})
    torch.testing.assert_close(resumed(x, (49,)), second, rtol=0, atol=0)

    draws.eval()
    fixed = draws(x, (49,))
    torch.testing.assert_close(draws(x, (49,)), fixed, rtol=0, atol=0)
    assert draws.count.item() == 2


def test_patchify_is_row_major_and_inverts():
    x = images(2, 3)
    patches = patchify(x, 4)
    assert patches.shape == (2, 49, 48)
    torch.testing.assert_close(patches[1, 7 + 2].view(4, 4, 3), x[1, :, 4:8, 8:12].permute(1, 2, 0))  # row 1, column 2
    torch.testing.assert_close(unpatchify(patches, 4, (7, 7)), x)
