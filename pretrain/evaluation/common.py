"""The evaluator protocol, its registry, and the one lock-step scheme of evaluations under ZeRO-3.

An evaluator is looked up by name (big_vision's `evaluators/common.py`), built by its task with
its own cadence, and run by the trainer as `run(ds_engine, step=..., final=..., tracker=...)`;
it returns metrics (the trainer logs them) and leaves the training RNG untouched (the trainer
runs it under `torch.random.fork_rng`).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator

import torch
import torch.distributed as dist

from pretrain.tracking.tracker import Tracker

EVALUATORS: dict[str, type["Evaluator"]] = {}


def register(name: str) -> Callable[[type], type]:
    def wrap(cls: type) -> type:
        EVALUATORS[name] = cls
        return cls

    return wrap


def build_evaluator(name: str, **kwargs: Any) -> "Evaluator":
    if name not in EVALUATORS:
        raise KeyError(f"unknown evaluator {name!r}; known: {', '.join(sorted(EVALUATORS))}")
    return EVALUATORS[name](**kwargs)


class Evaluator:
    """Cadence of every evaluator: every `every` steps (0: not periodically), after the last step
    when `final`, before the first step of a fresh run when `at_start` (metrics `<name>_at_start`)."""

    def __init__(self, *, every: int = 0, final: bool = True, at_start: bool = False):
        self.every, self.final, self.at_start = every, final, at_start

    def due(self, step: int, *, last: bool) -> bool:
        periodic = bool(self.every) and step % self.every == 0
        return periodic or (last and self.final)

    def run(self, ds_engine, *, step: int, final: bool, tracker: Tracker) -> dict[str, float]:
        raise NotImplementedError


def lockstep(batches: Iterable, *, sync: bool, device: torch.device) -> Iterator[tuple[Any, bool]]:
    """This rank's batches as (batch, real). With `sync` (ZeRO-3, whose every forward gathers each
    layer's weights collectively) all ranks step together until every one is done: a rank that has
    run out repeats its last batch, `real=False`, and discards the result."""
    last = None
    for batch in _with_end(batches):
        if sync:
            more = torch.tensor(float(batch is not None), device=device)
            dist.all_reduce(more, op=dist.ReduceOp.MAX)
            if not more:
                return
            if batch is None:
                if last is None:
                    raise ValueError(f"rank {dist.get_rank()} has no evaluation batch: use fewer ranks or more evaluation images")
                yield last, False
                continue
        elif batch is None:
            return
        last = batch
        yield batch, True


def _with_end(batches: Iterable) -> Iterator[Any]:
    """The batches, then None for ever."""
    yield from batches
    while True:
        yield None
