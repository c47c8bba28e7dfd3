# One entry point for set-up, the demo, the tests and the benchmarks. Every target creates the virtual
# environment first if it is missing (python3 -m venv + the pinned constraints), so a fresh clone needs nothing else.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export MLFLOW_DISABLE_TELEMETRY := true
export DVC_NO_ANALYTICS := 1
export HF_HUB_OFFLINE := 1
export DO_NOT_TRACK := 1
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 90

.PHONY: setup demo test test-fast bench clean

$(VENV)/.installed: requirements/ci.txt requirements/constraints.txt packages/ultraflux_model/pyproject.toml packages/ultraflux_eval/pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# Headless Chromium + its driver for the web app's real-browser test (Debian packages; root installs them).
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
	  else echo "note: install chromium and chromium-driver (apt) for the browser test"; fi; }
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements/ci.txt -c requirements/constraints.txt
	touch $@

setup: $(VENV)/.installed

## The main job: end to end on the embedded defaults (tiny model, synthetic data, SQLite MLflow, local DVC remote, ephemeral Prefect).
demo: setup
	$(PY) -m flows.pipeline --config params.yaml
	@echo "MLflow UI: $(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/artifacts/mlflow.db"

## The whole CPU test suite (Triton kernels run under TRITON_INTERPRET=1 in their own tests).
test: setup
	$(PY) -m pytest -n 2 --dist loadfile

bench: setup
	$(PY) -m benchmarks.run_all

clean:
	rm -rf artifacts storage mlruns .pytest_cache

## Wheels a bare GPU host lacks (requirements/gpu-wheels.txt), for benchmarks/gpu_check.sh; GPU_PY picks the
## host's Python (3.12); the folder travels with the checkout (ignored by git, well under 64 MiB).
GPU_PY ?= 3.12
GPU_WHEELS ?= build/gpu-wheels
.PHONY: gpu-wheels
gpu-wheels:
	rm -rf $(GPU_WHEELS) && mkdir -p $(GPU_WHEELS)
	$(if $(wildcard $(PY)),$(PY),python3) -m pip download --quiet --only-binary=:all: --no-deps --dest $(GPU_WHEELS) \
	  --python-version $(GPU_PY) --implementation cp --platform manylinux2014_x86_64 \
	  --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
	  -c requirements/constraints.txt -r requirements/gpu-wheels.txt
	@du -sh $(GPU_WHEELS) && ls $(GPU_WHEELS)
