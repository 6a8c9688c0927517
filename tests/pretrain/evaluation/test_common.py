"""The evaluators' registry, cadence and the one lock-step scheme, on 2 real gloo ranks."""
from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pretrain.evaluation import EVALUATORS, Evaluator, build_evaluator, lockstep


def test_every_evaluator_is_registered_by_name():
    assert set(EVALUATORS) == {"classification", "detection", "fewshot", "validation", "visualize"}
    with pytest.raises(KeyError, match="unknown evaluator 'map'; known: classification, detection"):
        build_evaluator("map")


def test_cadence_every_n_steps_and_after_the_last():
    periodic, final_only = Evaluator(every=5, final=False), Evaluator()
    assert [s for s in range(1, 13) if periodic.due(s, last=False)] == [5, 10]
    assert not periodic.due(12, last=True) and periodic.due(10, last=True)  # the last step is a multiple of 5
    assert not any(final_only.due(s, last=False) for s in range(1, 13)) and final_only.due(12, last=True)


def _ranks(rank: int, port: int, results) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    batches = [torch.full((2,), float(i)) for i in range(3 if rank == 0 else 1)]  # rank 1 runs out first
    seen = [(batch[0].item(), real) for batch, real in lockstep(batches, sync=True, device=torch.device("cpu"))]
    results[rank] = seen
    dist.destroy_process_group()


def test_lockstep_keeps_every_rank_stepping_until_all_are_done():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_ranks, args=(port, results), nprocs=2)
    assert results[0] == [(0.0, True), (1.0, True), (2.0, True)]
    assert results[1] == [(0.0, True), (0.0, False), (0.0, False)]  # its last batch again, discarded
    assert [(b, r) for b, r in lockstep(iter([1, 2]), sync=False, device=torch.device("cpu"))] == [(1, True), (2, True)]
