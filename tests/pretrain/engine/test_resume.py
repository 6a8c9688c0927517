"""Resume after SIGKILL (from S3, on a fresh output folder) and on another number of ranks."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from pretrain.checkpoint.checkpointer import to_universal
from pretrain.engine.ema import consolidated_ema
from tests.pretrain.engine.conftest import CKPT, STEPS


def test_kill9_then_resume_from_s3_continues_the_same_loss_curve(runs, zero_runs, killed_run, two_rank_resumes):
    assert killed_run["returncode"] != 0
    assert killed_run["remote_latest"] == f"step{CKPT:08d}"
    assert f"downloaded checkpoint step{CKPT:08d}" in two_rank_resumes
    assert f"resumed from step{CKPT:08d} at step {CKPT}" in two_rank_resumes
    resumed = runs.history("resumed")  # the killed run's MLflow run, continued
    assert runs.run_id("resumed") == runs.run_id("killed")
    reference = runs.history("zero2")  # the same recipe, uninterrupted
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step, values in resumed.items():
        # steps after the checkpoint were logged twice (before the kill and after): all the same numbers
        assert values == [pytest.approx(reference[step][0], rel=1e-6)] * len(values), step
    assert max(len(v) for v in resumed.values()) == 2, "the kill came before any step after the checkpoint"


def universal_state(folder):
    """{param: {fp32, exp_avg, exp_avg_sq, step}} of the DeepSpeed checkpoint in `folder`."""
    out = {}
    for param in sorted(p for p in (to_universal(folder) / "zero").iterdir() if p.is_dir()):  # beside optimizer_state.pt
        files = {f.stem: torch.load(f, weights_only=True) for f in param.glob("*.pt")}
        out[param.name] = {k: v["param"] if isinstance(v, dict) else v for k, v in files.items()}
    return out


@pytest.mark.parametrize("source, noop, ranks", [("single", "grow_noop", (1, 2)), ("zero2", "shrink_noop", (2, 1)),
                                                 ("zero3", "shrink3_noop", (2, 1))])
def test_resume_on_another_number_of_ranks_keeps_weights_and_optimizer_state(runs, two_rank_resumes, one_rank_resumes,
                                                                             source, noop, ranks, tmp_path):
    # The *_noop runs resumed at step 5 and, with nothing to train, saved again at their world size.
    before, after = tmp_path / "before", tmp_path / "after"
    shutil.copytree(runs.out(source) / "checkpoints" / f"step{CKPT:08d}", before)
    shutil.copytree(runs.out(noop) / "checkpoints" / f"step{CKPT:08d}", after)
    assert [json.loads((d / "meta.json").read_text())["world_size"] for d in (before, after)] == list(ranks)
    old, new = universal_state(before), universal_state(after)
    assert sorted(new) == sorted(old) and len(old) > 50
    for name in old:
        # ZeRO-3's universal form keeps no per-parameter step; the step is in meta.json
        assert {"exp_avg", "exp_avg_sq", "fp32"} <= new[name].keys() == old[name].keys(), name
        for kind in old[name]:
            torch.testing.assert_close(new[name][kind], old[name][kind], rtol=0, atol=0, msg=f"{name} {kind}")
    if source == "zero2":  # the sharded EMA, re-sliced from 2 ranks to 1
        for name, value in consolidated_ema(before).items():
            torch.testing.assert_close(consolidated_ema(after)[name], value, rtol=0, atol=0)


@pytest.mark.parametrize("source, resumed, world", [("single", "grow", 2), ("zero2", "shrink", 1)])
def test_training_continues_on_another_number_of_ranks(runs, two_rank_resumes, one_rank_resumes, source, resumed, world):
    assert f"saved on {3 - world} ranks, now {world}" in (two_rank_resumes if world == 2 else one_rank_resumes)
    got, ref = runs.history(resumed), runs.history(source)
    assert sorted(got) == list(range(CKPT + 1, STEPS + 1))
    assert runs.history(resumed, "world_size") == {CKPT: [float(world)]}
    assert runs.history(resumed, "grad_accum_steps") == {CKPT: [2.0 / world]}  # the global batch stays 32
    # The remaining samples are re-cut for the new number of ranks, so the batches differ from
    # the uninterrupted run's: the losses agree in level, not in every digit.
    for step in got:
        assert got[step][0] == pytest.approx(ref[step][0], rel=0.15), step
    meta = json.loads((runs.out(resumed) / "checkpoints" / f"step{STEPS:08d}" / "meta.json").read_text())
    assert meta["world_size"] == world and meta["step"] == STEPS
