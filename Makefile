# The README's commands. `make run` and `make test` each set up the virtual environment first if it is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1

.PHONY: setup run test check-sync nbtest pytest bench world

setup: $(VENV)/.installed

$(VENV)/.installed: settings.ini setup.py
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

# The main job: the offline base-to-new table on the world model and its datasets (pass ARGS="--param value ...").
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

# Pretrain the committed world model from scratch (one CPU thread, about 39 minutes; the committed one is data/world/),
# into outputs/world/pretrained/ (WORLD_ARGS="--steps N ..." to change it; `cocoamix world pretrain --help`).
world: setup
	OMP_NUM_THREADS=1 $(BIN)/cocoamix world pretrain --out outputs/world/pretrained --version world-v1 --steps 2550 --eval-every 250 $(WORLD_ARGS)
