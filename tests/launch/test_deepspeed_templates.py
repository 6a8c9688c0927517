"""Each launch/deepspeed/*.json, merged over the config our typed EngineConfig generates,
is accepted by DeepSpeed and trains: a real engine per template, two optimizer steps."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TEMPLATES = sorted((REPO / "launch" / "deepspeed").glob("*.json"))
# (typed engine config, template) pairs a user would combine
CASES = [
    ({"zero_stage": 1}, "zero1.json"),
    ({"zero_stage": 2}, "zero2.json"),
    ({"zero_stage": 3}, "zero3.json"),
    ({"zero_stage": 2, "precision": "bf16"}, "bf16.json"),
]


def test_every_template_is_covered():
    assert sorted(t.name for t in TEMPLATES) == sorted(name for _, name in CASES)


def test_templates_build_real_engines_that_train():
    """One child process (its own gloo group of 1) builds an engine per template."""
    from tests.launch.conftest import launcher_env

    done = subprocess.run([sys.executable, __file__], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=launcher_env() | {"PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert [r["template"] for r in results] == [name for _, name in CASES]
    for result, (engine, _) in zip(results, CASES):
        assert result["zero_stage"] == engine["zero_stage"], result
        assert result["bf16"] == (engine.get("precision") == "bf16"), result
        assert all(loss == loss and loss < 10 for loss in result["losses"]), result  # finite
        assert result["params_changed"], result


def _train_each_template() -> list[dict]:
    import os

    import torch
    import torch.nn as nn

    from pretrain.config import EngineConfig, OptimConfig
    from pretrain.engine.distributed import init_distributed, shutdown
    from pretrain.engine.deepspeed_engine import build_engine, train_step

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 4))

        def forward(self, x, y):
            return nn.functional.cross_entropy(self.net(x).float(), y), {}

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    init_distributed()
    results = []
    try:
        for engine_kwargs, name in CASES:
            engine = EngineConfig(**engine_kwargs, deepspeed_json=str(REPO / "launch" / "deepspeed" / name))
            torch.manual_seed(0)
            model = Tiny()
            before = [p.detach().clone() for p in model.parameters()]
            ds = build_engine(model, optim=OptimConfig(lr=1e-2), engine=engine, micro_batch=8, grad_accum_steps=1,
                              total_steps=2)
            batch = (torch.randn(8, 16), torch.randint(0, 4, (8,)))
            losses = [train_step(ds, [batch])[0] for _ in range(2)]
            if engine.zero_stage == 3:  # parameters are partitioned placeholders until gathered
                import deepspeed

                with deepspeed.zero.GatheredParameters(list(ds.module.parameters())):
                    after = [p.detach().float().clone() for p in ds.module.parameters()]
            else:
                after = [p.detach().float() for p in ds.module.parameters()]
            results.append({
                "template": name,
                "zero_stage": ds.zero_optimization_stage(),
                "bf16": ds.bfloat16_enabled(),
                "losses": losses,
                "params_changed": any(not torch.equal(a, b.float()) for a, b in zip(after, before)),
            })
    finally:
        shutdown()
    return results


if __name__ == "__main__":
    print(json.dumps(_train_each_template()))
