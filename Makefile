# Everything a newcomer needs: `make demo` (the main job) and `make test` (the tests).
# Both create the virtual environment on first use; nothing else needs installing first.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= outputs/demo
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1

.PHONY: setup demo test test-fast lint emoji-packages clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[ray,dev]"
	touch $@

## The main job on the embedded default: train a tiny model on the shipped emoji, grow it
## one stage and write sample grids of every resolution to $(OUT)/samples.
demo: setup
	$(VENV)/bin/mdm demo --out $(OUT)

## The whole test suite (unit + integration), as CI runs it.
test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check mdm tests

## Install the four emoji npm packages (the real raw image set) into .state/npm (needs npm).
emoji-packages: setup
	$(PY) -c "from pipelines.emoji import install_packages; install_packages('.state/npm')"

clean:
	rm -rf outputs .pytest_cache
