"""ĉ of the ``online_coef`` estimator at the default study's warm starts: is the batch's own
variance-optimal coefficient near the baseline map's c*?

    python scripts/online_coef.py [--seeds 0 1 2 3] [--batches 8]

For each seed, the warm-start network of the default study (warm-start seed 1234 + seed), ``--batches``
rollouts of 16 prompts × G; prints ĉ per batch (``grpo_lab.baselines.online_coefficient`` on the rollout's
own gradient-energy weights, as training computes it) and its mean with a t-interval over seeds
(``scipy.stats``). Nothing is trained.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from scipy import stats

from grpo_lab.advantages import logit_gradient_energy
from grpo_lab.baselines import online_coefficient
from grpo_lab.probe.precision import load_warm_start


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/ablate.yaml", help="the fit config whose warm start is used")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3], help="seeds (network and data)")
    p.add_argument("--batches", type=int, default=8, help="rollout batches per seed")
    p.add_argument("--prompts", type=int, default=16, help="prompts per batch")
    args = p.parse_args(argv)
    per_seed = []
    for seed in args.seeds:
        module, queries = load_warm_start(args.config, seed, warm_start_seed=1234 + seed)
        gen = torch.Generator().manual_seed(seed)
        cs = []
        with torch.no_grad():
            for _ in range(args.batches):
                batch = [queries[int(i)] for i in torch.randperm(len(queries), generator=gen)[: args.prompts]]
                rollout = module.rollout(batch)
                rewards = module.score(rollout, batch)[0]  # [P, G]
                w = logit_gradient_energy(rollout.logprobs, rollout.completion_mask).view_as(rewards)
                cs.append(float(online_coefficient(rewards, w)))
        per_seed.append(float(np.mean(cs)))
        print(f"seed {seed}: ĉ per batch " + " ".join(f"{c:.2f}" for c in cs) + f"; mean {per_seed[-1]:.3f}")
    m, se = float(np.mean(per_seed)), float(stats.sem(per_seed))
    lo, hi = stats.t.interval(0.95, len(per_seed) - 1, loc=m, scale=se)
    print(f"ĉ over {len(per_seed)} seeds: {m:.3f} [{lo:.3f}, {hi:.3f}] (95% t-interval)")


if __name__ == "__main__":
    main()
