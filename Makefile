# One entry point for set-up, the demo, the tests and the benchmarks. Every target creates the virtual
# environment first if it is missing (python3 -m venv + the pinned constraints), so a fresh clone needs nothing else.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# As in an activated venv: console scripts the tools exec by name (uvicorn, dvc, hadolint …) are found.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export MLFLOW_DISABLE_TELEMETRY := true
export DVC_NO_ANALYTICS := 1
export HF_HUB_OFFLINE := 1
export DO_NOT_TRACK := 1
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 90

.PHONY: setup demo demo-lora test test-deps test-fast bench clean ui

$(VENV)/.installed: requirements/ci.txt requirements/constraints.txt $(wildcard packages/*/pyproject.toml)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements/ci.txt -c requirements/constraints.txt
	$(PY) -m pip install -q --no-deps -c requirements/constraints.txt pyiqa  # MUSIQ and Q-Align arch code; see docs/evaluation.md
	touch $@

setup: $(VENV)/.installed

## The main job: end to end on the embedded defaults (tiny model, synthetic data, SQLite MLflow, local DVC remote, ephemeral Prefect).
## It prints one progress line per step and a closing summary (release, champion, report, VAE table, next commands).
## What the libraries would add is kept out (each can be turned back on by exporting it): Prefect's and MLflow's
## INFO logs (every task start and finish, "creating tables"), the Hugging Face load/save bars that break into the
## training bar and MLflow's download bars, transformers' and diffusers' notes on their own deprecated internals.
demo: export PREFECT_LOGGING_LEVEL ?= WARNING
demo: export MLFLOW_LOGGING_LEVEL ?= WARNING
demo: export HF_HUB_DISABLE_PROGRESS_BARS ?= 1
demo: export MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR ?= false
demo: export TRANSFORMERS_VERBOSITY ?= error
demo: export DIFFUSERS_VERBOSITY ?= error
demo: setup
	$(PY) -m flows.pipeline --config params.yaml

## System packages of the tests only (never of the demo): headless Chromium + its driver for the web app's
## real-browser test (Debian packages; root installs them, anyone else gets a note and that one test is skipped).
test-deps:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
	  else echo "note: install chromium and chromium-driver (apt) for the browser test; without them it is skipped"; fi; }

## A LoRA on the tiny model from six captioned images, tracked in MLflow, then one image with it (CPU).
demo-lora: setup
	$(PY) -m ultraflux.lora_demo
	@echo "MLflow UI: $(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/artifacts/lora-demo/train/mlflow.db"

## The whole CPU test suite (Triton kernels run under TRITON_INTERPRET=1 in their own tests).
test: setup test-deps
	$(PY) -m pytest -n 2 --dist loadfile

bench: setup
	$(PY) -m benchmarks.run_all

clean:
	rm -rf artifacts storage mlruns .pytest_cache

## Static checks of the production stack (docs/deploy.md): every infra/k8s manifest against Kubernetes 1.32's strict
## schemas, hadolint on the Dockerfiles, the MLflow compose file's structure. No cluster or Docker needed.
.PHONY: infra-check
infra-check: setup
	$(PY) -m pytest tests/test_infra.py -q -p no:cacheprovider

## Mutation guard: each curated bug in tests/mutations/mutations.toml, applied to a copy of the repo, must fail its tests.
.PHONY: mutants
mutants: setup
	$(PY) tests/mutations/run.py --workers 2 --json artifacts/mutants.json

## UltraFlux Studio on the demo's release (after `make demo`): the registry's champion, else the newest release dir,
## side by side with the newest other release. Open http://127.0.0.1:7860 (loopback only).
ui: setup
	@export MLFLOW_TRACKING_URI=$${MLFLOW_TRACKING_URI:-sqlite:///$(CURDIR)/artifacts/mlflow.db} GRADIO_ANALYTICS_ENABLED=False; \
	  models=$$($(PY) -m ultraflux_model.app.models artifacts/release) || exit 2; \
	  echo "ultraflux ui $$models"; $(VENV)/bin/ultraflux ui $$models --out artifacts/studio --steps 4

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
