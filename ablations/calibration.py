"""The verdicts' error rates, by simulation through the report's own code.

    python -m ablations.calibration --out runs/calibration.json      # ~1-2 min on 2 cores
    python -m ablations.calibration --reps 400 --out /tmp/c.json     # a quick look

Each procedure is run on simulated studies whose truth is known: per-seed paired differences drawn normal
with the spreads the default study measured (``SPREADS``: the AUC difference, the hard-query lift difference
and the SNR log ratio, at 8 seeds), turned into ``stats.Paired`` by ``stats.differences`` and judged by
``verdicts.verdict`` / ``verdicts.family_verdicts`` (Holm) / ``sequential.should_stop`` with
``verdicts.planned_seeds`` and ``stats.stein``, exactly as a report and ``--until-decisive`` do. For each
procedure the JSON gives

    procedures.<name>.type1        the rate of the error the procedure promises to keep at α = 0.05
    procedures.<name>.type1_mc_se  its Monte-Carlo standard error, √(p(1 − p)/reps)
    procedures.<name>.power        the rate of the right verdict at the planned effect (``planned``)

- ``fixed_n`` (AUC difference, 8 seeds): type-I = a *holds* or *opposite* when the true difference is 0;
  power = *holds* at the planned MDE (80% power by the noncentral t, ``stats.mde``).
- ``fixed_n_log`` (SNR log ratio): the same on the ratio scale.
- ``equivalence`` (AUC, 8 seeds, SESOI 0.02): type-I = a claim of a difference below the SESOI
  (*equivalent*, or a *holds* of *negligible* size) when the true difference sits on the margin; power =
  such a claim at a true difference of 0 with the margin the TOST planning gives 80% power
  (``verdicts.equivalence_margin``).
- ``holm_family``: the default study's family (the 3 claims × 2 estimators against `reward`, the two
  comparisons sharing the baseline arm's noise, correlation ½). type-I = any false *holds*/*opposite* when
  every difference is 0 (family-wise); ``type1_equivalence`` = any false claim below the SESOI when
  every difference sits on its margin; power = the mean share of the family found at each metric's MDE
  at α/(2m) (the planned MDE under Holm's first step).
- ``sequential`` (AUC, SD ``SEQUENTIAL_SD``, so that the rounds do run): ``--until-decisive`` from 8
  seeds, 2 per round, at most 32, Stein's two-stage design (the first 8 seeds plan the seeds for a 95%
  interval of ±SESOI/2, the test uses their SD): type-I = a final *holds*/*opposite* at a true 0; power =
  *holds* at the 8-seed planned MDE; ``mean_seeds`` at the stop.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from ablations.report.judge import DECIDING
from ablations.report.stats import ALPHA, differences, mde, stein
from ablations.report.verdicts import equivalence_margin, family_verdicts, margin, planned_seeds, verdict
from ablations.runner.sequential import should_stop

# SD of the per-seed paired differences in the default study (8 seeds; docs/results.md), and the
# SESOI of each metric (summary.DEFAULT_MIN_EFFECT; the SNR ratio's relative).
SPREADS = {"auc_diff": 0.0077, "hard_lift_diff": 0.0165, "snr_ratio": 0.066}
SESOI = {"auc_diff": 0.02, "hard_lift_diff": 0.03, "snr_ratio": 0.10}
SEEDS = 8
# The sequential procedure at the default study's AUC spread stops at once (8 seeds already give ±0.0064,
# within SESOI/2 = 0.01): its looks are simulated on a study 2.6x as noisy, where the rounds run (8 -> ~20
# seeds), which is where optional stopping would inflate the type-I error.
SEQUENTIAL_SD = 0.02


def _paired(x: np.ndarray, log: bool = False):
    return differences(dict(enumerate(x.tolist())), log=log)


def negligible(v) -> bool:
    """A claim that any difference is smaller than the SESOI: *equivalent*, or a *holds*/*opposite* of
    negligible size (TOST rejects in both)."""
    return v.code == "equivalent" or v.size == "negligible"


def _rate(hits: int, reps: int) -> dict[str, float]:
    p = hits / reps
    return {"rate": p, "mc_se": math.sqrt(max(p * (1 - p), 1e-12) / reps)}


def fixed_n(rng: np.random.Generator, reps: int, metric: str = "auc_diff", n: int = SEEDS) -> dict:
    sd, log = SPREADS[metric], metric == "snr_ratio"
    planned = mde(sd, n)
    wrong = sum(verdict(_paired(rng.normal(0.0, sd, n), log), SESOI[metric]).code in ("holds", "opposite")
                for _ in range(reps))
    found = sum(verdict(_paired(rng.normal(planned, sd, n), log), SESOI[metric]).code == "holds"
                for _ in range(reps))
    return _result(wrong, found, reps, {"metric": metric, "n": n, "sd": sd, "planned_effect": planned})


def equivalence(rng: np.random.Generator, reps: int, metric: str = "auc_diff", n: int = SEEDS) -> dict:
    sd, log = SPREADS[metric], metric == "snr_ratio"
    on_margin = margin(_paired(np.zeros(2), log), SESOI[metric])
    wrong = sum(negligible(verdict(_paired(rng.normal(on_margin, sd, n), log), SESOI[metric]))
                for _ in range(reps))
    planned = equivalence_margin(sd, n)  # the margin TOST resolves with 80% power at a true 0
    sesoi = math.expm1(planned) if log else planned
    found = sum(negligible(verdict(_paired(rng.normal(0.0, sd, n), log), sesoi)) for _ in range(reps))
    return _result(wrong, found, reps, {"metric": metric, "n": n, "sd": sd, "sesoi": SESOI[metric],
                                        "planned_margin": planned})


def _family_draw(rng: np.random.Generator, effects: dict[str, float], n: int) -> dict:
    """One simulated default study: per metric, 2 estimators' differences to a shared baseline arm (the
    baseline's noise in both: correlation ½)."""
    tests = {}
    for metric, sd in SPREADS.items():
        arm_sd = sd / math.sqrt(2)  # a difference of two arms with SD arm_sd has SD sd
        base = rng.normal(0.0, arm_sd, n)
        for est in ("group_norm", "rloo"):
            x = rng.normal(effects[metric], arm_sd, n) - base
            tests[(est, metric)] = (_paired(x, metric == "snr_ratio"), metric, True)
    return tests


def holm_family(rng: np.random.Generator, reps: int, n: int = SEEDS) -> dict:
    m = 2 * 2 * len(SPREADS)  # difference and equivalence tests of 2 estimators x 3 metrics
    zero = {k: 0.0 for k in SPREADS}
    on_margin = {k: math.log1p(SESOI[k]) if k == "snr_ratio" else SESOI[k] for k in SPREADS}
    planned = {k: mde(sd, n, alpha=ALPHA / m) for k, sd in SPREADS.items()}
    wrong = wrong_eq = 0
    found = []
    for _ in range(reps):
        v = family_verdicts(_family_draw(rng, zero, n), SESOI)
        wrong += any(x.code in ("holds", "opposite") for x in v.values())
        v = family_verdicts(_family_draw(rng, on_margin, n), SESOI)
        wrong_eq += any(negligible(x) for x in v.values())
        v = family_verdicts(_family_draw(rng, planned, n), SESOI)
        found.append(np.mean([x.code == "holds" for x in v.values()]))
    out = _result(wrong, float(np.sum(found)), reps, {"n": n, "hypotheses": m, "planned_effects": planned})
    out["type1_equivalence"], out["type1_equivalence_mc_se"] = (lambda r: (r["rate"], r["mc_se"]))(
        _rate(wrong_eq, reps))
    return out


def run_sequential(rng: np.random.Generator, effect: float, metric: str = "auc_diff", first: int = SEEDS,
                   round_seeds: int = 2, max_seeds: int = 32, sd: float | None = None) -> tuple[str, int]:
    """One ``--until-decisive`` study on simulated seeds: the first stage plans its seeds
    (``verdicts.planned_seeds``), rounds run until ``should_stop``, and the verdict is on Stein's statistic
    (``stats.stein``); returns the final verdict's code and the seeds used."""
    sd, log = sd or SPREADS[metric], metric == "snr_ratio"
    x = rng.normal(effect, sd, first)
    stage = set(range(first))
    plan = planned_seeds(_paired(x, log), stage, SESOI[metric], max_seeds)
    while should_stop([metric] if len(x) < plan else [], len(x), round_seeds, max_seeds) is None:
        x = np.concatenate([x, rng.normal(effect, sd, round_seeds)])
    return verdict(stein(_paired(x, log), stage), SESOI[metric]).code, len(x)


def sequential(rng: np.random.Generator, reps: int, metric: str = "auc_diff",
               sd: float = SEQUENTIAL_SD) -> dict:
    planned = mde(sd, SEEDS)
    null = [run_sequential(rng, 0.0, metric, sd=sd) for _ in range(reps)]
    alt = [run_sequential(rng, planned, metric, sd=sd) for _ in range(reps)]
    wrong = sum(code in ("holds", "opposite") for code, _ in null)
    found = sum(code == "holds" for code, _ in alt)
    out = _result(wrong, found, reps, {"metric": metric, "first_seeds": SEEDS, "round_seeds": 2,
                                       "max_seeds": 32, "sd": sd, "planned_effect": planned,
                                       "design": "Stein two-stage, 95% half-width SESOI/2"})
    out["mean_seeds"] = {"null": float(np.mean([k for _, k in null])),
                         "planned": float(np.mean([k for _, k in alt]))}
    out["undecided_at_stop"] = sum(code == "cannot tell" for code, _ in null + alt) / (2 * reps)
    return out


def _result(wrong: int, found: float, reps: int, setting: dict) -> dict:
    t = _rate(wrong, reps)
    return {"type1": t["rate"], "type1_mc_se": t["mc_se"], "power": found / reps,
            "power_mc_se": _rate(int(round(found)), reps)["mc_se"], "reps": reps, **setting}


PROCEDURES = {
    "fixed_n": lambda rng, reps: fixed_n(rng, reps, "auc_diff"),
    "fixed_n_log": lambda rng, reps: fixed_n(rng, reps, "snr_ratio"),
    "equivalence": lambda rng, reps: equivalence(rng, reps, "auc_diff"),
    "holm_family": holm_family,
    "sequential": sequential,
}


def calibrate(reps: int, seed: int = 0, only: list[str] | None = None) -> dict:
    """Every procedure (or ``only`` those) at ``reps`` simulated studies each; ``ok`` says whether each
    type-I error is at most α within 2 Monte-Carlo SE."""
    out: dict = {"alpha": ALPHA, "reps": reps, "seed": seed, "spreads": SPREADS, "sesoi": SESOI,
                 "deciding": list(DECIDING), "procedures": {}}
    for name, run in PROCEDURES.items():
        if only and name not in only:
            continue
        t0 = time.perf_counter()
        res = run(np.random.default_rng([seed, len(name)]), reps)
        res["ok"] = res["type1"] <= ALPHA + 2 * res["type1_mc_se"]
        res["seconds"] = round(time.perf_counter() - t0, 1)
        out["procedures"][name] = res
    return out


def table(result: dict) -> str:
    """The README's markdown table of a calibration."""
    lines = ["| procedure | type-I error (± MC SE) | power at the planned effect | within α + 2 SE |",
             "|---|---|---|---|"]
    for name, r in result["procedures"].items():
        lines.append(f"| `{name}` | {r['type1']:.4f} ± {r['type1_mc_se']:.4f} | {r['power']:.3f} | "
                     f"{'yes' if r['ok'] else 'NO'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ablations.calibration",
                                description="Type-I error and power of the report's verdict procedures, by "
                                            "simulation through the report's own code.")
    p.add_argument("--out", required=True, help="where to write the JSON (procedures.<name>.{type1, ...})")
    p.add_argument("--reps", type=int, default=4000, help="simulated studies per procedure and truth")
    p.add_argument("--seed", type=int, default=0, help="seed of the simulation")
    p.add_argument("--only", nargs="*", choices=sorted(PROCEDURES), help="run only these procedures")
    args = p.parse_args(argv)
    if args.reps < 10:
        print(f"error: --reps must be >= 10, got {args.reps}", file=sys.stderr)
        return 2
    result = calibrate(args.reps, args.seed, args.only)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"\nwritten to {out}")
    return 0 if all(r["ok"] for r in result["procedures"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
