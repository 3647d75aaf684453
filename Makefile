# The README's commands. `make run` and `make test` each set up the virtual environment first if it is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1

.PHONY: setup run test check-sync nbtest pytest bench

setup: $(VENV)/.installed

$(VENV)/.installed: settings.ini setup.py
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

# The main job: the offline base-to-new table on the built-in data and tiny model (pass ARGS="--param value ...").
run: setup
	$(BIN)/cocoamix run base2new $(ARGS)

# Notebooks clean and library in sync (CI fails on any difference), then the notebook tests and pytest.
test: setup check-sync nbtest pytest

check-sync: setup
	$(BIN)/nbdev_clean
	$(BIN)/nbdev_export
	@if [ -n "$$CI" ] && [ -n "$$(git status --porcelain)" ]; then \
	  echo "nbdev_clean/nbdev_export changed files: commit clean notebooks and the exported library"; \
	  git status --porcelain; git diff --stat; exit 1; fi

nbtest: setup
	$(BIN)/nbdev_test --n_workers 2

pytest: setup
	$(BIN)/pytest -q tests

bench: setup
	$(BIN)/cocoamix bench $(ARGS)
