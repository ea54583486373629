"""How noisy is each advantage estimator's gradient? The gradient-variance probe, and its command line.

The claim behind every baseline in ``advantages.py`` is *variance reduction*. The probe measures it on
the actual policy, at fixed parameters, without perturbing a training run: K independent rollout batches,
every estimator's gradient on the same rollouts, and per estimator the signal-to-noise ratio with a
95% interval over the batches (the delta method on its U-statistics: ``probe/intervals.py``), the paired
SNR ratio to a baseline estimator, the cosine with an unbiased reference ∇J and the share of the gradient
that comes from hard queries. The code lives in the ``grpo_lab.probe`` package (``stats`` pure math,
``gradients`` the backward passes, ``core`` the probe, ``cache`` the per-policy cache, ``callback`` the
Lightning callback); this module keeps the names it always had and the command line::

    python -m grpo_lab.variance --ckpt runs/.../last.ckpt --num-batches 64 --out probe.json

or attach :class:`GradientVarianceProbe` to a ``Trainer`` to probe at the start, middle and end of a fit.
"""

from __future__ import annotations

import argparse
import math
import pickle
import time
import zipfile
from pathlib import Path

import torch

from grpo_lab.probe.cache import write_json as _write_json
from grpo_lab.probe.callback import GradientVarianceProbe
from grpo_lab.probe.core import (
    DEFAULT_ESTIMATORS,
    NUM_BATCHES,
    PROMPTS_PER_BATCH,
    REFERENCE_ESTIMATOR,
    probe,
)
from grpo_lab.probe.gradients import REFERENCE_AGGREGATION, batch_gradients, estimator_gradients
from grpo_lab.probe.gram_stats import gradient_statistics, gram_statistics
from grpo_lab.system.entry import run_cli
from grpo_lab.system.errors import UserError, UserFileNotFoundError

__all__ = ["DEFAULT_ESTIMATORS", "GradientVarianceProbe", "batch_gradients", "build_parser",
           "estimator_gradients", "gradient_statistics", "gram_statistics", "load_module", "main", "probe"]


# ---- command line -------------------------------------------------------------------------------------
def _table(stats: dict[str, dict[str, float | None]], title: str):
    from rich.table import Table

    def cell(s: dict, key: str) -> str:
        v = s.get(key)
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4g}"

    table = Table(title=title)
    table.add_column("estimator")
    ratio_to = next(iter(stats.values())).get("ratio_to")
    for header in ("snr [95% CI]", f"snr / {ratio_to}'s [95% CI]", "cosine", "hard share", "V/‖ḡ‖²", "‖ḡ‖"):
        table.add_column(header, justify="right", no_wrap=True)
    for name, s in stats.items():
        table.add_row(name, f"{cell(s, 'snr')} [{cell(s, 'snr_lo')}, {cell(s, 'snr_hi')}]",
                      f"{cell(s, 'snr_ratio')} [{cell(s, 'snr_ratio_lo')}, {cell(s, 'snr_ratio_hi')}]",
                      *(cell(s, k) for k in ("cosine", "hard_share", "relative_variance", "mean_norm")))
    return table


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m grpo_lab.variance",
        description="Measure each advantage estimator's gradient signal-to-noise ratio (with a delta-method "
        "interval over the batches and the paired ratio to the first estimator), its cosine with an unbiased "
        "estimate of ∇J and the share of hard queries, at the parameters of a GRPOModule checkpoint.",
    )
    parser.add_argument("--ckpt", required=True, help="path to a GRPOModule Lightning checkpoint (.ckpt)")
    parser.add_argument(
        "--estimators", nargs="+", default=list(DEFAULT_ESTIMATORS),
        help="advantage estimators to compare, by registry name (default: %(default)s)",
    )
    parser.add_argument("--num-batches", type=int, default=NUM_BATCHES,
                        help="K, independent rollout batches per estimator (>= 2; default: %(default)s)")
    parser.add_argument("--reference-batches", type=int, default=0,
                        help="further batches used only for the reference gradient of J; 0: the K batches "
                             "serve (default: %(default)s)")
    parser.add_argument(
        "--reference-estimator", default=REFERENCE_ESTIMATOR,
        help="unbiased estimator of the reference ∇J with constant aggregation: rloo (needs G >= 2) or "
        "reward (plain REINFORCE, noisier) (default: %(default)s)",
    )
    parser.add_argument("--prompts-per-batch", type=int, default=PROMPTS_PER_BATCH,
                        help="queries per rollout batch; each gets the checkpoint's G completions (default: "
                             "%(default)s)")
    parser.add_argument("--dataset", default="arithmetic",
                        help="built-in task name or .jsonl path the queries come from (default: %(default)s)")
    parser.add_argument("--num-queries", type=int, default=2048,
                        help="queries generated for a built-in task (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the queries and of the probe's sampling (default: %(default)s)")
    parser.add_argument("--sketch-dim", type=int, default=0, metavar="D",
                        help="keep each gradient as a D-dim CountSketch made on --device (unbiased dot "
                             "products, relative error about sqrt(2/D); grpo_lab/probe/sketch.py), so K "
                             "batches of a 100M+ model fit in memory, e.g. 65536; 0: the exact probe, "
                             "float32 rows of every parameter on the CPU (default: %(default)s)")
    parser.add_argument("--device", default="cpu",
                        help="torch device to run the probe on, e.g. cpu or cuda (default: %(default)s)")
    parser.add_argument("--out", default="probe.json",
                        help="where to write the results as JSON (default: %(default)s)")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of a user error, not just its line")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bar and no table, only the JSON file")
    parser.add_argument(
        "--trust-checkpoint", action="store_true",
        help="unpickle the checkpoint in full (torch.load weights_only=False): only for checkpoints you made "
        "yourself, e.g. with an optimizer callable in its hyperparameters",
    )
    return parser


def probe_cost(seconds: float, device: str) -> dict[str, float | None]:
    """The probe's wall time, this process's peak resident memory and (on CUDA) the peak memory torch
    allocated on the device, for ``bench/gpu_check.sh``."""
    import resource

    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    cuda = torch.device(device).type == "cuda" and torch.cuda.is_available()
    return {"seconds": round(seconds, 2), "max_rss_bytes": float(rss_kib * 1024),
            "cuda_max_allocated_bytes": float(torch.cuda.max_memory_allocated(device)) if cuda else None}


def load_module(ckpt: str | Path, trust: bool = False):
    """``GRPOModule.load_from_checkpoint`` on CPU. By default with ``weights_only`` torch loading, the config
    dataclasses allow-listed; ``trust`` unpickles everything (a checkpoint whose hyperparameters hold other
    objects, such as an optimizer callable, needs it)."""
    from grpo_lab.model.policy import PolicyConfig
    from grpo_lab.model.warmstart import WarmStartConfig
    from grpo_lab.module import GRPOModule

    if trust:
        return GRPOModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=False)
    try:
        with torch.serialization.safe_globals([PolicyConfig, WarmStartConfig]):
            return GRPOModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UserError(
            f"{ckpt}: cannot be loaded with weights_only torch loading ({err}). "
            "If you made this checkpoint yourself, rerun with --trust-checkpoint."
        ) from None


def main(argv: list[str] | None = None) -> dict[str, dict[str, float | None]]:
    """``python -m grpo_lab.variance``: a bad checkpoint path or setting is one ``error:`` line and exit
    status 2 (``--debug`` for the traceback; see ``grpo_lab.system.errors``). Returns the statistics."""
    return run_cli(_main, argv)


def _main(argv: list[str] | None) -> dict[str, dict[str, float | None]]:
    args = build_parser().parse_args(argv)
    from grpo_lab.data.tasks import load_queries

    if args.sketch_dim < 0:
        raise UserError(f"--sketch-dim must be >= 0 (0: the exact probe), got {args.sketch_dim}")

    if not Path(args.ckpt).is_file():
        raise UserFileNotFoundError(f"--ckpt {args.ckpt}: no such checkpoint file")
    if not zipfile.is_zipfile(args.ckpt):  # what torch.save (and so Lightning) has written since torch 1.6
        raise UserError(f"--ckpt {args.ckpt}: not a checkpoint (a Lightning .ckpt is a zip archive written "
                        "by torch.save)")

    module = load_module(args.ckpt, trust=args.trust_checkpoint).to(args.device)
    queries = load_queries(args.dataset, args.num_queries, args.seed)
    t0 = time.perf_counter()
    stats = probe(
        module, queries, args.estimators, args.num_batches, args.reference_batches, args.prompts_per_batch,
        args.seed, progress=not args.quiet, reference_estimator=args.reference_estimator,
        sketch_dim=args.sketch_dim,
    )
    payload = {
        "ckpt": str(args.ckpt),
        "config": {k: v for k, v in vars(args).items() if k not in ("ckpt", "out", "quiet")}
        | {"reference": f"{args.reference_estimator}/{REFERENCE_AGGREGATION}",
           "num_generations": module.hparams.num_generations, "aggregation": module.hparams.aggregation},
        "results": [{"estimator": name, **s} for name, s in stats.items()],
        "cost": probe_cost(time.perf_counter() - t0, args.device),
    }
    _write_json(Path(args.out), payload)
    if not args.quiet:
        from rich.console import Console

        console = Console()
        console.print(_table(stats, f"gradient probe of {args.ckpt}"))
        ref_snr = next(iter(stats.values()))["reference_snr"]
        if ref_snr is not None:
            console.print(f"reference ∇J: {args.reference_estimator}/{REFERENCE_AGGREGATION}, per-batch SNR "
                          f"{ref_snr:.3g}; cosines compare expected gradients (pairs of different batches "
                          "only: not attenuated by noise)")
        console.print(f"wrote {args.out}")
    return stats


if __name__ == "__main__":
    main()
