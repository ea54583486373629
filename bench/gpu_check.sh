#!/usr/bin/env bash
# The GPU check (issue 12): grpo-lab fit on CUDA with bf16-mixed for a ~100M-parameter Llama (50 steps), the
# same under the ddp and fsdp strategies on one GPU, the bench shapes scaled up against TRL's GRPOTrainer, and
# the gradient-variance probe on the GPU; writes results/gpu.json. Meant for <= 8 minutes on one H100.
#
#   bash bench/gpu_check.sh              # on the GPU machine: installs bench/wheels (make gpu-wheels) first
#   bash bench/gpu_check.sh --dry-run    # the same steps on CPU at tiny sizes; JSON to a temp path
#
# The steps live in bench/gpu_check.py (stdlib only until the wheels are installed); PYTHON picks the
# interpreter (default python3: the one with the machine's torch). Extra flags: python -m bench.gpu_check --help.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" -m bench.gpu_check "$@"
