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

# Pretrain the world model from scratch (one CPU thread, about 40 minutes; the committed one is data/world/).
world: setup
	mkdir -p outputs/world
	WORLD_PRETRAIN=1 WORLD_OUT=outputs/world OMP_NUM_THREADS=1 $(BIN)/python -c "import os, json, torch; torch.set_num_threads(1); \
	from cocoamix.world import pretrain, save_world_model; \
	r = pretrain(steps=int(os.environ.get('WORLD_STEPS', 2550)), batch_size=128, lr=1e-3, warmup=100, seed=0, eval_every=250, out_dir='outputs/world'); \
	print(save_world_model(r['model'], 'outputs/world/world_model.safetensors', r.get('used_tokens'), r.get('history')))"
