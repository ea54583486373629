"""How precise is the probe at a config's warm start? Half-widths of the paired SNR-ratio intervals.

    python -m grpo_lab.probe.precision --config configs/ablate.yaml --num-batches 64 --seeds 0 1 2

For each seed: the probe at the warm start the config's fits start from (built if absent), with the
seed's data and probe seed as a study trial of that seed has them. Prints per estimator the SNR ratio to
the first estimator with its 95% interval over the K batches (``intervals.py``) and the interval's
relative half-width, the seconds the probe took, and, over the seeds, the t-interval of the mean log ratio
(how the report pools seeds).

``--same-policy`` probes one policy (the first seed's warm start and data) once per seed, the seed as the
probe's seed only: independent replicates, whose spread the points' own intervals should match. It prints
their calibration (:func:`replicate_calibration`), the figure in docs/ablations.md ("The probe's precision").
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

from grpo_lab.probe.core import DEFAULT_ESTIMATORS, NUM_BATCHES, PROMPTS_PER_BATCH, probe, relative_half_width
from grpo_lab.system.process_env import configure_process

RATIO_KEYS = ("snr_ratio", "snr_ratio_lo", "snr_ratio_hi")


def load_warm_start(config: str, seed: int, warm_start_seed: int | None = None):
    """``(module, train queries)`` of ``grpo-lab fit --config <config>`` with ``seed`` at its first step
    (``warm_start_seed``: that warm-start network, as a study's ``networks`` population gives each seed)."""
    from grpo_lab.cli import cli_main
    from grpo_lab.model.warmstart import ensure_warm_start, load_weights

    extra = [] if warm_start_seed is None else ["--model.warm_start.seed", str(warm_start_seed)]
    cli = cli_main(["--config", config, "--seed_everything", str(seed), "--data.seed", str(seed), *extra],
                   run=False)
    module, dm = cli.model, cli.datamodule
    if module.warm_start_cfg.steps > 0:
        path = ensure_warm_start(module.policy_cfg, module.warm_start_cfg, dm.hparams.dataset)
        load_weights(module.model, path)
    dm.setup("fit")
    return module, dm.train_set


def replicate_calibration(x: list[float], lo: list[float], hi: list[float]) -> dict[str, float]:
    """Independent probes of one policy: their estimates ``x`` (log scale) and 95% intervals [lo, hi] (log).
    ``hits``/``n``: intervals that hold the mean of the *other* estimates (the truth up to σ/√(n − 1): a
    calibrated interval holds it with probability P(|t| ≤ t_0.975 / √(1 + 1/(n − 1))), ~0.947 at n = 20);
    ``sd`` of the estimates, ``rms_se`` the standard error the intervals imply (log(hi/lo) / (2 z_0.975),
    root mean square) and ``share`` = rms_se² / sd² (the report's ``probe_noise_share`` on replicates:
    ~100% when calibrated)."""
    from scipy import stats as sps

    x, lo, hi = (np.asarray(v, dtype=np.float64) for v in (x, lo, hi))  # [n] each
    others = (x.sum() - x) / (len(x) - 1)
    se = (hi - lo) / (2 * sps.norm.ppf(0.975))
    sd = float(np.std(x, ddof=1))
    rms = float(np.sqrt(np.mean(se**2)))
    return {"hits": int(np.sum((lo <= others) & (others <= hi))), "n": len(x), "sd": sd, "rms_se": rms,
            "share": rms**2 / sd**2 if sd > 0 else math.nan}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m grpo_lab.probe.precision",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/ablate.yaml",
                   help="the fit config whose warm start is probed")
    p.add_argument("--num-batches", type=int, default=NUM_BATCHES, help="K batches per probe point")
    p.add_argument("--prompts-per-batch", type=int, default=PROMPTS_PER_BATCH, help="queries per batch")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="seeds (data and probe), one point each")
    p.add_argument("--estimators", nargs="+", default=list(DEFAULT_ESTIMATORS),
                   help="the first is the ratios' baseline")
    p.add_argument("--same-policy", action="store_true",
                   help="probe the first seed's warm start and data at every seed (the probe's seed only)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (a study's trial gets cores / workers)")
    args = p.parse_args(argv)
    configure_process()
    torch.set_num_threads(args.threads)
    logs: dict[str, list[float]] = {e: [] for e in args.estimators[1:]}
    bounds: dict[str, list[tuple[float, float, float]]] = {e: [] for e in args.estimators[1:]}
    print(f"K = {args.num_batches} batches of {args.prompts_per_batch} prompts at the warm start of "
          f"{args.config}")
    for seed in args.seeds:
        if not args.same_policy or seed == args.seeds[0]:
            module, queries = load_warm_start(args.config, seed)
        t0 = time.perf_counter()
        stats = probe(module, queries, args.estimators, args.num_batches, 0, args.prompts_per_batch, seed)
        took = time.perf_counter() - t0
        cells = []
        for e in args.estimators[1:]:
            s = stats[e]
            cells.append(f"{e} ×{s['snr_ratio']:.3f} [{s['snr_ratio_lo']:.3f}, {s['snr_ratio_hi']:.3f}] "
                         f"±{relative_half_width(s):.0%}")
            if s["snr_ratio"] > 0 and math.isfinite(s["snr_ratio"]):
                logs[e].append(math.log(s["snr_ratio"]))
                if s["snr_ratio_lo"] > 0 and math.isfinite(s["snr_ratio_hi"]):
                    bounds[e].append(tuple(math.log(s[k]) for k in RATIO_KEYS))
        print(f"seed {seed}: {took:.1f} s ({took / args.num_batches:.3f} s/batch); " + "; ".join(cells))
    from scipy import stats as sps

    pooled = {}
    for e, x in logs.items():
        if len(x) >= 2:
            half = sps.t.ppf(0.975, len(x) - 1) * np.std(x, ddof=1) / math.sqrt(len(x))
            pooled[e] = (math.exp(np.mean(x)), math.exp(np.mean(x) - half), math.exp(np.mean(x) + half))
            print(f"pooled over {len(x)} seeds: {e} ×{pooled[e][0]:.3f} [{pooled[e][1]:.3f}, "
                  f"{pooled[e][2]:.3f}] ±{(pooled[e][2] - pooled[e][1]) / 2 / pooled[e][0]:.0%}")
        if args.same_policy and len(bounds[e]) >= 3:
            c = replicate_calibration(*zip(*bounds[e], strict=True))
            print(f"replicates of one policy: {e}: {c['hits']}/{c['n']} intervals hold the other points' "
                  f"mean; SD of the log ratios {c['sd']:.4f}, RMS SE of the intervals {c['rms_se']:.4f} "
                  f"(share {c['share']:.0%})")
    return pooled


if __name__ == "__main__":
    main()
