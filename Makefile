# grpo_lab: the two set-up commands are `make install` and `make test`; `make ablate` runs the main job.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
PYTHON  := $(BIN)/python
# The offline environment variables are set by each program where it starts (grpo_lab/system/process_env.py).

.PHONY: install test test-serial test-fast lint smoke tiny warmstart tensorboard ablate ablate-precise ablate-smoke bench gpu-wheels gpu-check-dry math-sample clean

install: $(BIN)/grpo-lab ## create .venv, torch (CPU file on disk) first, then the project with [dev]

$(BIN)/grpo-lab: pyproject.toml
	test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	# torch first and exactly 2.13.0: the CPU build on disk. Anything else pulls GBs of CUDA.
	$(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -e '.[dev]'
	touch $@

test: install ## the whole suite, fast and slow, on 2 pytest-xdist workers (CI has 2 cores)
	$(BIN)/pytest -q -n 2

test-serial: install ## the whole suite in one process (slower; for debugging a test's interaction with another)
	$(BIN)/pytest -q

test-fast: install
	$(BIN)/pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check grpo_lab ablations tests bench scripts

smoke: install
	$(BIN)/grpo-lab fit --config configs/smoke.yaml

warmstart: install ## build (or reuse) the cached supervised warm start for configs/tiny.yaml
	$(BIN)/grpo-lab warmstart --config configs/tiny.yaml

tiny: install
	$(BIN)/grpo-lab fit --config configs/tiny.yaml

tensorboard: install
	$(BIN)/tensorboard --logdir runs

ablate: install ## the default study: 3 estimators + an A/A arm x 8 seeds, report under runs/ablate/default/ (docs/results.md: time)
	$(BIN)/grpo-lab-ablate --space default

ablate-precise: install ## the default study, then Stein's planned seeds for every SNR ratio within ±10% (docs/ablations.md)
	$(BIN)/grpo-lab-ablate --space default --until-decisive --snr-precision 0.10 --budget 20m

ablate-smoke: install
	$(BIN)/grpo-lab-ablate --space smoke

bench: install
	$(PYTHON) -m pip install -q -e '.[bench]'
	$(PYTHON) -m bench.benchmark

# The GPU machine of bench/gpu_check.sh has torch, lightning, transformers, tensorboard and torchmetrics and no
# network: this downloads the rest (scripts/gpu_requirements.txt and its dependencies, never torch or CUDA
# libraries) as wheels for its Python and platform into bench/wheels/, which travels with the script.
GPU_PY       ?= 3.11
GPU_PLATFORM ?= manylinux_2_28_x86_64
GPU_HAVE     ?=
gpu-wheels: install ## wheels for bench/gpu_check.sh's offline GPU machine -> bench/wheels/ (GPU_HAVE="pyarrow pandas" if it has them)
	$(PYTHON) scripts/gpu_wheels.py --python-version $(GPU_PY) --platform $(GPU_PLATFORM) --out bench/wheels $(if $(GPU_HAVE),--have $(GPU_HAVE))

gpu-check-dry: install ## bench/gpu_check.sh's steps on CPU at tiny sizes (JSON to a temp dir)
	PYTHON=$(PYTHON) bash bench/gpu_check.sh --dry-run

math-sample: install ## build the local Qwen2-architecture model and run configs/math_sample.yaml (wiring, not learning)
	$(PYTHON) -m grpo_lab.model.build_model --arch qwen2 --out runs/models/qwen2-math --corpus examples/math_sample.jsonl
	$(BIN)/grpo-lab fit --config configs/math_sample.yaml

clean:
	rm -rf runs .pytest_cache
