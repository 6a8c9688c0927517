"""`build_tracker` on 2 gloo ranks posing as 2 nodes: one MLflow run, system metrics named per node."""
from __future__ import annotations

import multiprocessing
import socket
import time

from mlflow.tracking import MlflowClient

from pretrain.tracking.tracker import build_tracker


def _rank(rank: int, port: int, uri: str) -> None:
    """One rank of a 2-rank job whose ranks sit on hosts `node0` and `node1`."""
    import torch.distributed as dist

    socket.gethostname = lambda: f"node{rank}"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    tracker = build_tracker(is_main=rank == 0, tracking_uri=uri, experiment="nodes", run_name="two-nodes",
                            tags={"stage": "pretrain"})
    time.sleep(1.5)  # a sample a second, and the last window at close
    dist.barrier()
    tracker.close()
    dist.destroy_process_group()


def test_each_node_samples_its_system_metrics_into_rank_0s_run(tracking_uri, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spawn = multiprocessing.get_context("spawn")
    ranks = [spawn.Process(target=_rank, args=(rank, port, tracking_uri)) for rank in (0, 1)]
    for p in ranks:
        p.start()
    for p in ranks:
        p.join(timeout=300)
    assert [p.exitcode for p in ranks] == [0, 0]
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("nodes").experiment_id])
    for node in ("node0", "node1"):
        key = f"system/{node}/cpu_utilization_percentage"
        assert key in run.data.metrics and len(client.get_metric_history(run.info.run_id, key)) >= 2, node
        assert f"system/{node}/system_memory_usage_megabytes" in run.data.metrics
    assert not [k for k in run.data.metrics if k.startswith("system/") and k.split("/")[1] not in ("node0", "node1")]
