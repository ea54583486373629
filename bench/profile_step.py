"""Where grpo_lab's training step spends its time, on a bench shape: ``python -m bench.profile_step``.

Two views of the same Lightning fit (the work of ``bench/peers.py``: saved random policy, fixed-length
completions, beta = 0, one AdamW step per batch):

1. phase wall times, without the profiler, read through public hooks only: the phases the module names
   itself (``GRPOModule.timer``: rollout, reward, advantage, loss and within it policy_loss, metrics,
   backward, clip), the policy's forward passes split into decode (one token), prefill / no-grad and
   training (torch forward hooks), the optimizer's update (torch's optimizer step hook, minus the clipping
   that runs inside the step), and the Lightning remainder; per-operator detail is the profiler's job;
2. with ``--torch-profile``, ``torch.profiler`` (record_shapes) over the timed steps: the top operators by
   self CPU time (the module's phases are named in the trace), and a Chrome trace with ``--trace PATH``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings
from collections import defaultdict
from pathlib import Path

from bench.work import grpo_module, grpo_trainer, query_data, save_policy_for, shape_spec
from grpo_lab.system.process_env import configure_process

FORWARD = {"decode": "model forward (decode, 1 token)", "prefill": "model forward (prefill / no-grad)",
           "train": "model forward (train, grad)"}
UPDATE, AFTER = "optimizer update (AdamW)", "after the update (Lightning, to on_train_batch_end)"
ACCOUNTED = ("rollout", "reward", "advantage", "loss", "metrics", "backward", "clip", UPDATE, AFTER)


def step_profiler(warmup: int, torch_profile):
    """A Lightning callback that turns the module's phase timer on and keeps, per step, the seconds and
    calls of each phase (``.steps``, ``.calls``); it starts ``torch_profile`` (if any) at step ``warmup``."""
    import torch
    from lightning.pytorch.callbacks import Callback

    class StepProfiler(Callback):
        def __init__(self) -> None:
            self.steps: list[dict[str, float]] = []
            self.calls: list[dict[str, int]] = []
            self.fwd_seconds: dict[str, float] = defaultdict(float)
            self.fwd_calls: dict[str, int] = defaultdict(int)
            self.open: list[tuple[str, float]] = []
            self.marks: dict[str, float] = {}

        def _forward_starts(self, model, args, kwargs) -> None:
            ids = kwargs.get("input_ids", args[0] if args else None)
            kind = "train" if torch.is_grad_enabled() else "decode" if ids is not None and ids.shape[1] == 1 \
                else "prefill"
            self.open.append((FORWARD[kind], time.perf_counter()))

        def _forward_ends(self, model, args, kwargs, output) -> None:
            name, t0 = self.open.pop()
            self.fwd_seconds[name] += time.perf_counter() - t0
            self.fwd_calls[name] += 1

        def on_train_start(self, trainer, pl_module) -> None:
            pl_module.timer.enabled = True
            pl_module.model.register_forward_pre_hook(self._forward_starts, with_kwargs=True)
            pl_module.model.register_forward_hook(self._forward_ends, with_kwargs=True)
            trainer.optimizers[0].register_step_post_hook(self._stepped)

        def _stepped(self, optimizer, args, kwargs) -> None:  # torch's optimizer step post-hook
            self.marks["stepped"] = time.perf_counter()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if torch_profile is not None and trainer.global_step == warmup:
                torch_profile.__enter__()
            self.marks = {"start": time.perf_counter()}

        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:  # before the module's clip
            self.marks["clip"] = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            end = time.perf_counter()
            seconds, calls = pl_module.timer.pop()
            if "stepped" in self.marks:  # the update: from the clip's start to the step's end, minus the clip
                seconds[UPDATE] = self.marks["stepped"] - self.marks["clip"] - seconds.get("clip", 0.0)
                seconds[AFTER] = end - self.marks["stepped"]
            seconds.update(self.fwd_seconds)
            calls.update(self.fwd_calls)
            seconds["step_total"] = end - self.marks["start"]
            self.steps.append(seconds)
            self.calls.append(calls)
            self.fwd_seconds, self.fwd_calls = defaultdict(float), defaultdict(int)

    return StepProfiler()


def report(timed: list[dict[str, float]], calls: list[dict[str, int]], spec: dict, header: str) -> dict:
    """Print the median phase table of the timed steps; the medians and the derived phases (seconds)."""
    names = sorted({k for s in timed for k in s},
                   key=lambda k: -statistics.median(s.get(k, 0.0) for s in timed))
    med = {k: statistics.median(s.get(k, 0.0) for s in timed) for k in names}
    total = med["step_total"]
    derived = {
        "rollout: non-forward (sampling, softmax, cat, bookkeeping, decode)":
            med.get("rollout", 0) - med.get(FORWARD["decode"], 0) - med.get(FORWARD["prefill"], 0),
        "loss: non-forward, not policy_loss (log-softmax, entropy)":
            med.get("loss", 0) - med.get(FORWARD["train"], 0) - med.get("policy_loss", 0),
        "Lightning + rest (the step minus the phases not indented above)":
            total - sum(med.get(k, 0) for k in ACCOUNTED),
    }
    every = ", ".join(f"{s['step_total'] * 1000:.0f}" for s in timed)
    print(header + f"; step = {total * 1000:.1f} ms (all: {every})")
    print(f"{'phase':<78} {'ms/step':>9} {'share':>7} {'calls':>6}")
    for k in names:
        if k != "step_total":
            seen = any(k in cs for cs in calls)
            c = f"{statistics.median(cs.get(k, 0) for cs in calls):6.0f}" if seen else ""
            inner = "  " if k in FORWARD.values() or k == "policy_loss" else ""  # inside rollout / loss
            print(f"{inner + k:<78} {med[k] * 1000:9.1f} {med[k] / total:7.1%} {c:>6}")
    for k, v in derived.items():
        print(f"{k:<78} {v * 1000:9.1f} {v / total:7.1%}")
    ndec = statistics.median(cs.get(FORWARD["decode"], 0) for cs in calls)
    if ndec:
        print(f"per decode forward: {med[FORWARD['decode']] / ndec * 1000:.2f} ms; per generated token "
              f"position (whole rollout / T): {med['rollout'] / spec['completion_tokens'] * 1000:.2f} ms")
    return {"median": med, "derived": derived}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.profile_step", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--shape", choices=["bench", "tiny"], default="bench",
                   help="configs/bench.yaml or configs/bench_tiny.yaml")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps")
    p.add_argument("--steps", type=int, default=3, help="timed (and profiled) steps")
    p.add_argument("--bf16", action="store_true", help="trainer precision bf16-mixed")
    p.add_argument("--torch-profile", action="store_true",
                   help="also run torch.profiler over the timed steps")
    p.add_argument("--trace", type=Path, default=None,
                   help="write a Chrome trace here (with --torch-profile)")
    p.add_argument("--top", type=int, default=30, help="operators to list in the profiler table")
    p.add_argument("--json", type=Path, default=None, help="write the phase table as JSON here")
    p.add_argument("--attn", choices=["sdpa", "eager"], default=None,
                   help="grpo_lab's attention kernel (default: the shape config's "
                   "policy.attn_implementation)")
    args = p.parse_args(argv)
    configure_process()
    warnings.filterwarnings("ignore")
    import lightning as L
    import torch

    spec = shape_spec(args.shape)
    policy = Path(tempfile.mkdtemp(prefix="grpo_profile_")) / "policy"
    save_policy_for(spec, 0, policy)
    L.seed_everything(0, verbose=False)
    module = grpo_module(spec, policy, attn=args.attn)
    prof = None
    if args.torch_profile:
        from torch.profiler import ProfilerActivity, profile

        prof = profile(activities=[ProfilerActivity.CPU], record_shapes=True)  # the timed steps, all of them
    profiler = step_profiler(args.warmup, prof)
    trainer = grpo_trainer(args.warmup + args.steps, [profiler], args.bf16)
    trainer.fit(module, datamodule=query_data(spec))
    if prof is not None:
        prof.__exit__(None, None, None)

    timed, calls = profiler.steps[args.warmup:], profiler.calls[args.warmup:]
    header = (f"\nshape {args.shape} ({'bf16-mixed' if args.bf16 else 'fp32'}), threads "
              f"{torch.get_num_threads()}, median over {len(timed)} timed steps")
    out = report(timed, calls, spec, header)
    if args.json:
        args.json.write_text(json.dumps({"median_ms": {k: v * 1000 for k, v in out["median"].items()},
                                         "derived_ms": {k: v * 1000 for k, v in out["derived"].items()},
                                         "steps": timed, "calls": calls}, indent=2))
    if prof is not None:
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top,
                                        max_name_column_width=60))
        print(prof.key_averages(group_by_input_shape=True).table(
            sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=50,
            max_shapes_column_width=60))
        if args.trace:
            prof.export_chrome_trace(str(args.trace))


if __name__ == "__main__":
    main()
