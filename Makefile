# Two entry points: `make demo` and `make test`. Both bootstrap .venv on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
FMNIST_DIR := /usr/share/datasets/fashion-mnist
# DeepSpeed JIT-builds a small op on first init. A cache inside this checkout's venv is built
# once per clone and never waits on a lock left by another checkout's interrupted build.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/$(VENV)/torch_extensions

.PHONY: demo test install install-test system-deps test-deps clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# constraints.txt pins torch/torchvision/deepspeed to the wheels of this machine.
$(VENV)/.installed: pyproject.toml constraints.txt | $(PY)
	$(PY) -m pip install -q -c constraints.txt -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml constraints.txt | $(PY)
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

# Real data for the demo and the real-data tests: Debian's Fashion-MNIST IDX files.
system-deps:
	@if [ ! -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ]; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    apt-get install -y -q dataset-fashion-mnist || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist); \
	  else echo "Fashion-MNIST missing: install Debian's dataset-fashion-mnist (needs root)"; exit 1; fi; \
	fi

demo: install system-deps
	$(PY) -m pretrain demo

# The launcher tests start a real Slurm controller and node daemons on localhost; the MLflow UI
# test drives headless Chromium through ChromeDriver.
test-deps: system-deps
	@if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    apt-get install -y -q slurm-wlm munge || (apt-get update -q && apt-get install -y -q slurm-wlm munge); \
	  else echo "Slurm missing: install Debian's slurm-wlm and munge (needs root)"; exit 1; fi; \
	fi
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    apt-get install -y -q chromium chromium-driver || (apt-get update -q && apt-get install -y -q chromium chromium-driver); \
	  else echo "Chromium missing: install Debian's chromium and chromium-driver (needs root)"; exit 1; fi; \
	fi

test: install-test test-deps
	$(PY) -m pytest

clean:
	rm -rf mlflow.db mlartifacts runs demo_out
