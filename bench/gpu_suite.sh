#!/usr/bin/env bash
# The GPU figures of this project in one command, about 5-8 minutes on one H100/H200, no network:
#   - ViT-B/16, L/16 and H/14 bf16 training samples/s and MFU, eager and torch.compile'd
#   - the data loader's ceiling (all CPU cores, JPEG shards) against the step's demand
#   - the MAE speed-up over the full-token step (bench/mae_speedup.py, ViT-L/16)
#   - ZeRO-3 against ZeRO-2 step time (ViT-L/16)
# Each figure is appended to bench/RESULTS.md as a dated row.
#
#   bench/gpu_suite.sh             on a CUDA machine, after `make install`
#   bench/gpu_suite.sh --dry-run   the same code on the CPU, tiny models, a few steps, no rows
#                                  written (tests/bench/test_gpu_suite_dry_run.py runs it)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
# Nothing is fetched: no hub weights, no telemetry; DeepSpeed's ops JIT-build into the venv's cache.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DO_NOT_TRACK=1
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.venv/torch_extensions}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec timeout "${GPU_SUITE_TIMEOUT:-600}" "$PY" bench/gpu_suite.py "$@"
