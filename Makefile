# grpo_lab: the two set-up commands are `make install` and `make test`; `make ablate` runs the main job.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
PYTHON  := $(BIN)/python
# Threads: the machine has 2 cores; torch picks its own count inside each process.
export TOKENIZERS_PARALLELISM := false
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install test test-fast lint smoke tiny warmstart tensorboard ablate ablate-smoke bench clean

install: $(BIN)/grpo-lab ## create .venv, torch (CPU file on disk) first, then the project with [dev]

$(BIN)/grpo-lab: pyproject.toml
	test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	# torch first and exactly 2.13.0: the CPU build on disk. Anything else pulls GBs of CUDA.
	$(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -e '.[dev]'
	touch $@

test: install ## the whole suite, fast and slow
	$(BIN)/pytest -q

test-fast: install
	$(BIN)/pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check grpo_lab ablations tests bench

smoke: install
	$(BIN)/grpo-lab fit --config configs/smoke.yaml

warmstart: install ## build (or reuse) the cached supervised warm start for configs/tiny.yaml
	$(BIN)/grpo-lab warmstart --config configs/tiny.yaml

tiny: install
	$(BIN)/grpo-lab fit --config configs/tiny.yaml

tensorboard: install
	$(BIN)/tensorboard --logdir runs

ablate: install ## the default study: 4 estimators x 3 seeds, report under runs/ablate/default/
	$(BIN)/grpo-lab-ablate --space default

ablate-smoke: install
	$(BIN)/grpo-lab-ablate --space smoke

bench: install
	$(PYTHON) -m pip install -q -e '.[bench]'
	$(PYTHON) bench/run.py

clean:
	rm -rf runs .pytest_cache
