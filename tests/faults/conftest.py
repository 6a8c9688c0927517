"""Fault injection on loopback and CPU: what breaks, what is lost, how it recovers.

Each scenario injects one fault into real parts (a DeepSpeed engine on a gloo process
group, moto's S3 server, real files and processes) and asserts on what a user would see.
`bench/faults.py` runs them all and prints the table of scenarios; each test's docstring
is its row: `fault | lost | recovery`.
"""
from __future__ import annotations

import socket
import struct

import pytest
import torch

from pretrain.config import EngineConfig, OptimConfig
from tests.fixtures.s3_server import DroppingProxy


class TinyObjective(torch.nn.Module):
    """A backbone with a BatchNorm (buffers) and a loss: the smallest thing DeepSpeed trains."""

    def __init__(self):
        super().__init__()
        self.backbone = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 4))

    def forward(self, x, y):
        return torch.nn.functional.cross_entropy(self.backbone(x), y), {}


@pytest.fixture
def tiny_engine(one_process_group):
    """A real DeepSpeed ZeRO-1 engine on the single-rank group (tests/fixtures/process_group.py);
    `train_one()` trains it one step."""
    from pretrain.engine.deepspeed_engine import build_engine

    torch.manual_seed(0)
    engine = build_engine(TinyObjective(), optim=OptimConfig(lr=1e-2), engine=EngineConfig(zero_stage=1),
                          micro_batch=4, total_steps=100, grad_accum_steps=1)

    def step():
        loss, _ = engine(torch.randn(4, 8), torch.randint(0, 4, (4,)))
        engine.backward(loss)
        engine.step()

    engine.train_one = step
    return engine


class KillableProxy(DroppingProxy):
    """The S3 server as clients see it when it is killed and restarted: `kill()` resets every
    open connection and refuses new ones (reset at once), `restart()` serves again; the store
    behind it (moto) keeps what it held, as a restarted SeaweedFS or MinIO does from its disk."""

    down = False

    def kill(self) -> None:
        self.down = True
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()
            except OSError:
                pass

    def restart(self) -> None:
        self.down = False

    def _serve(self, client: socket.socket, upstream: socket.socket) -> None:
        if self.down:
            for sock in (client, upstream):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()
            return
        super()._serve(client, upstream)


@pytest.fixture
def killable_s3(s3_server, monkeypatch):
    """storage's S3 client pointed at moto through a KillableProxy (no botocore retries: the
    code under test recovers by itself)."""
    from data_pipeline import storage

    host, port = s3_server.endpoint_url.removeprefix("http://").rsplit(":", 1)
    with KillableProxy(host, int(port), s3_server) as proxy:
        for name, value in proxy.s3.env().items():
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
        storage.reset_s3_clients()
        yield proxy
    storage.reset_s3_clients()


@pytest.fixture(scope="session")
def small_shards(tmp_path_factory) -> str:
    """512 real Fashion-MNIST images in 4 shards (Debian's dataset-fashion-mnist)."""
    from tests.fixtures.fmnist import write_fmnist_shards

    return write_fmnist_shards(tmp_path_factory.mktemp("shards"), "train", images=512, per_shard=128)
