"""Several training runs in one launch: `pretrain.tasks.pretrain.run` once per `--job`, in one process group.

    python -m tests.pretrain.engine.multirun --config C --job "k=v k=v" --job "k=v" ...

The tests pay torch's, DeepSpeed's and the process group's start-up (~15 s per launch on two
busy cores) once per launch instead of once per run; each run is the trainer's own `run`,
the body of `python -m pretrain train`, with the recipe and overrides parsed the same way.
"""
from __future__ import annotations

import argparse
import shlex

import torch.distributed as dist

from pretrain.config import PretrainConfig, load_config
from pretrain.engine.distributed import init_distributed, print0, shutdown
from pretrain.tasks.pretrain import run


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--job", action="append", required=True, help="space-separated key=value overrides of one run")
    args = parser.parse_args()
    configs = [load_config(PretrainConfig, args.config, shlex.split(r)) for r in args.job]  # all fail before any work
    dist_info = init_distributed()
    try:
        for cfg in configs:
            print0(f"=== run {cfg.train.output_dir}")
            run(cfg, dist_info)
            dist.barrier()
    finally:
        shutdown()


if __name__ == "__main__":
    main()
