"""ZeRO-0..3 on 2 ranks against 1 rank with the same global batch and the same samples per step,
bf16 with accumulation, the logged metrics, and the few-shot and visualization hooks."""
from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from tests.pretrain.engine.conftest import FEWSHOT_ARGS, STEPS

STAGES = ("zero0", "zero1", "zero2", "zero3")


def first(history: dict[int, list[float]]) -> dict[int, float]:
    return {step: values[0] for step, values in history.items()}


def test_one_rank_accumulates_to_the_global_batch(runs, single_run):
    assert sorted(runs.history("single")) == list(range(1, STEPS + 1))
    assert first(runs.history("single", "grad_accum_steps")) == {0: 2.0}  # global batch 32 = 1 rank x 16 x 2


@pytest.mark.parametrize("name", STAGES)
def test_two_ranks_at_every_zero_stage_follow_the_one_rank_run(runs, single_run, zero_runs, name):
    # Same samples, same initial weights, the same mean gradient: only the summation order differs.
    ref, got = first(runs.history("single")), first(runs.history(name))
    assert sorted(got) == sorted(ref)
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=2e-4, abs=1e-5), (name, step)
    assert first(runs.history(name, "grad_accum_steps")) == {0: 1.0}


def test_bf16_with_accumulation_follows_the_fp32_run(runs, single_run, zero_runs):
    ref, got = first(runs.history("single")), first(runs.history("bf16"))
    assert first(runs.history("bf16", "grad_accum_steps")) == {0: 2.0}  # 2 ranks x micro-batch 8 x 2
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=3e-2), step


def test_stages_partition_the_optimizer_state_and_zero3_the_weights(runs, zero_runs):
    def files(name):
        folder = runs.out(name) / "checkpoints" / "step00000010"
        return {p.name: p.stat().st_size for p in folder.glob("*.pt")}

    # ZeRO-0: one file with the whole module and the whole optimizer state (3 fp32 copies).
    whole = files("zero0")
    assert list(whole) == ["mp_rank_00_model_states.pt"]
    for name in ("zero1", "zero2"):
        found = files(name)
        assert set(found) == {"mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                              "zero_pp_rank_1_mp_rank_00_optim_states.pt"}
        for rank in (0, 1):  # fp32 master + 2 moments of half the parameters each
            assert 0.45 < found[f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"] / whole["mp_rank_00_model_states.pt"] < 0.6
    found = files("zero3")
    assert set(found) == {f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt" for r in (0, 1) for kind in ("model", "optim")}
    # ZeRO-3's model files hold placeholders only: the weights live in the optimizer partitions
    assert max(found[f"zero_pp_rank_{r}_mp_rank_00_model_states.pt"] for r in (0, 1)) < 0.1 * whole["mp_rank_00_model_states.pt"]
    meta = json.loads((runs.out("zero3") / "checkpoints" / "step00000010" / "meta.json").read_text())
    assert meta["config"]["engine"]["zero_stage"] == 3 and meta["config"]["model"]["grad_checkpointing"] is True


def test_logged_metrics_and_mfu(runs, zero_runs):
    client = MlflowClient(f"sqlite:///{runs.db}")
    run = client.get_run(runs.run_id("zero0"))
    metrics = run.data.metrics
    for key in ("loss", "accuracy", "lr", "grad_norm", "samples_per_s", "step_time_s", "data_wait_fraction",
                "memory_bytes", "bad_samples", "mfu"):
        assert key in metrics, key
    assert 0 <= metrics["data_wait_fraction"] < 1 and metrics["lr"] == pytest.approx(5e-4)
    # ZeRO-0 fp32: the norm read from the reduced gradients; ZeRO-2: DeepSpeed's own
    for step, norm in runs.history("zero0", "grad_norm").items():
        assert norm[0] > 0 and norm[0] == pytest.approx(runs.history("zero2", "grad_norm")[step][0], rel=1e-3), step
    flops = float(run.data.params["flops_per_sample"])
    assert flops > 3 * 10e6  # vit_demo: ~14 MFLOPs forward per 28 px image
    # MFU = samples/s x FLOPs per sample / (ranks x train.peak_flops), per logged window
    for step in (5, 10):
        sps = runs.history("zero0", "samples_per_s")[step][0]
        assert runs.history("zero0", "mfu")[step][0] == pytest.approx(sps * flops / (2 * 1e11), rel=1e-6)
    assert "mfu" not in client.get_run(runs.run_id("zero1")).data.metrics  # CPU: no peak FLOP/s known


def test_fewshot_hook_scores_the_trained_zero3_backbone(runs, zero_runs):
    from pretrain.checkpoint.export import load_exported
    from pretrain.tasks.fewshot import evaluate_fewshot

    history = runs.history("zero3", "fewshot/digits/10shot")
    assert list(history) == [STEPS]
    assert history[STEPS][0] > 0.2  # chance is 0.1
    # the hook's gathered copy holds the trained weights: the exported model scores the same
    model, meta = load_exported(runs.out("zero3") / "export" / "model.safetensors")
    results = evaluate_fewshot(model, data_root=None, image_size=meta["image_size"], mean=meta["mean"], std=meta["std"], **FEWSHOT_ARGS)
    assert results.accuracy["digits"][10] == [pytest.approx(history[STEPS][0], abs=1e-6)]


def test_visualize_hook_writes_and_logs_a_png(runs, zero_runs):
    png = runs.out("mae3") / "visualize" / "step00000002.png"
    with Image.open(png) as image:
        assert image.format == "PNG" and image.width > 96 and image.height > 8 * 96
    client = MlflowClient(f"sqlite:///{runs.db}")
    run_id = client.search_runs([client.get_experiment_by_name("test-engine").experiment_id],
                                filter_string="tags.mlflow.runName = 'mae3'")[0].info.run_id
    assert [a.path for a in client.list_artifacts(run_id, "visualize")] == ["visualize/step00000002.png"]
