"""grpo_lab against TRL's GRPOTrainer on identical work, and the GPU check; run from the repository root.

    python -m bench.benchmark      # make bench: both peers on the bench shapes -> results/bench.json
    python -m bench.profile_step   # where grpo_lab's step spends its time
    bash bench/gpu_check.sh        # the GPU check (python -m bench.gpu_check)

The modules: ``work`` (a shape's work: spec, FLOPs, policy, grpo_lab's module and trainer), ``machine`` (the
matmul peak, the machine, the other processes' load), ``peers`` (one peer's timed steps in its own process),
``figures`` (step statistics, ratios, targets, the table) and ``benchmark`` (the benchmark's command
line).
"""
