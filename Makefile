# Everything a newcomer needs: `make demo` (the main job) and `make test` (the tests).
# Both create the virtual environment on first use; nothing else needs installing first.
# `make stack-down` stops the local stack (S3 server, MLflow server, Ray head) `make demo` leaves running.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= outputs/demo
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
# The embedded default keeps its state (stack, MLflow database, run checkpoints) here.
export MDM_STATE_DIR ?= $(CURDIR)/.state

.PHONY: setup demo demo-local test lint emoji-packages stack-up stack-down clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[ray,dev]"
	touch $@

## The main job on the embedded default: start the local stack (S3 server, MLflow server,
## Ray head), build the emoji raw set, preprocess it, train stage 64 and stage 128 as Ray
## jobs (Ray Train + DeepSpeed), serve stage 128 over HTTP and save generated images and a
## grid to $(OUT). About 11 minutes on 2 CPU cores (--quick: 5). `make stack-down` stops the stack.
demo: setup emoji-packages
	$(PY) infra/local/demo.py --out $(OUT)

## The model library alone, no Ray: train a tiny model on the 16 shipped emoji, grow it one
## stage and write sample grids of every resolution to $(OUT)-local/samples (~8 minutes).
demo-local: setup
	$(VENV)/bin/mdm demo --out $(OUT)-local

stack-up: setup
	$(PY) infra/local/stack.py up

stack-down:
	$(PY) infra/local/stack.py down

## The whole test suite (unit + integration), as CI runs it.
test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check mdm tests

## Install the four emoji npm packages (the real raw image set) into .state/npm (needs npm).
emoji-packages: setup
	@test -d .state/npm/node_modules/openmoji || \
	  $(PY) -c "from pipelines.emoji import install_packages; install_packages('.state/npm')"

clean:
	rm -rf outputs .pytest_cache
