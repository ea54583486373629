"""Overlay the learning curves of a few ``grpo-lab fit`` runs (e.g. fp32 vs bf16-mixed on ``tiny.yaml``).

    python -m bench.compare_runs fp32=runs/tiny/version_0 bf16=runs/tiny/version_1 \
        --out docs/tiny_precision.png

Runs given the same label are seeds of one setting (drawn in one colour). Prints, per run, the first-10% and
last-10% mean of ``train/reward`` (the README's learning lift) and the last validation accuracies, and writes
one PNG: the reward's moving average and the sampled validation accuracy on easy and hard queries.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ablations.report.curves import moving_average
from grpo_lab.train.tensorboard_scalars import learning_lift, read_scalars


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("runs", nargs="+", help="label=TensorBoard run directory, one per run")
    p.add_argument("--out", default="compare.png", help="the PNG to write")
    p.add_argument("--window", type=int, default=50, help="moving-average window (steps) for train/reward")
    args = p.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_r, ax_v) = plt.subplots(1, 2, figsize=(11, 4))
    groups: dict[str, list[dict]] = {}  # runs with the same label are seeds of one setting
    for spec in args.runs:
        label, _, path = spec.partition("=")
        if not path:
            raise SystemExit(f"expected label=path, got {spec!r}")
        scalars = read_scalars(Path(path))
        if "train/reward" not in scalars:
            raise SystemExit(f"{path}: no train/reward scalars")
        steps, reward = zip(*sorted(scalars["train/reward"]), strict=True)
        first, last = learning_lift(list(reward))
        finals = {tag.removeprefix("val/"): sorted(v)[-1][1]
                  for tag, v in scalars.items() if tag.startswith("val/acc_sampled")}
        print(f"{label} ({path}): train/reward first 10% {first:.3f} -> last 10% {last:.3f} "
              f"(lift {last - first:+.3f}); " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(finals.items())))
        groups.setdefault(label, []).append({"steps": steps, "reward": reward, "scalars": scalars})
    for label, runs in groups.items():
        color = None
        for k, run in enumerate(runs):
            line, = ax_r.plot(run["steps"], moving_average(list(run["reward"]), args.window), color=color,
                              lw=1.2,
                              label=f"{label} ({len(runs)} run{'s' if len(runs) > 1 else ''})" if k == 0
                              else None)
            color = line.get_color()
            for tag, style in (("val/acc_sampled_easy", "-"), ("val/acc_sampled_hard", "--")):
                if tag in run["scalars"]:
                    s, v = zip(*sorted(run["scalars"][tag]), strict=True)
                    ax_v.plot(s, v, style, marker="o", ms=3, color=color,
                              label=f"{label} {tag.rsplit('_', 1)[1]}" if k == 0 else None)
    ax_r.set(title=f"train/reward ({args.window}-step moving average)", xlabel="step", ylabel="mean reward")
    ax_v.set(title="sampled validation accuracy (solid easy, dashed hard)", xlabel="step", ylabel="accuracy")
    for ax in (ax_r, ax_v):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
