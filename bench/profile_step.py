"""Where grpo_lab's training step spends its time, on a bench shape: ``python bench/profile_step.py``.

Two views of the same Lightning fit (the set-up of bench/peers.py: saved random policy, fixed-length
completions, beta = 0, one AdamW step per batch):

1. phase wall times, without the profiler: the step is cut by wrapping grpo_lab's own functions (in this
   process only; nothing is edited) and by Lightning callback hooks: rollout (prefill forward, per-token
   decode forwards, sampling/bookkeeping between them, decode), reward, advantage, loss forward
   (model forward, log-prob/entropy, policy loss), metrics logging, backward, grad-norm + clip,
   optimizer step, and the Lightning remainder;
2. with ``--torch-profile``, ``torch.profiler`` (record_shapes) over the timed steps: the top operators by
   self CPU time, and a Chrome trace with ``--trace PATH``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
warnings.filterwarnings("ignore")

ROOT = Path(__file__).resolve().parent.parent


class Phases:
    """Accumulated wall time per named phase for the current step."""

    def __init__(self) -> None:
        self.cur: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.steps: list[dict[str, float]] = []
        self.step_calls: list[dict[str, int]] = []

    def add(self, name: str, seconds: float) -> None:
        self.cur[name] += seconds
        self.calls[name] += 1

    def wrap(self, name, fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(name, time.perf_counter() - t)

        return inner

    def end_step(self, total: float) -> None:
        self.cur["step_total"] = total
        self.steps.append(dict(self.cur))
        self.step_calls.append(dict(self.calls))
        self.cur, self.calls = defaultdict(float), defaultdict(int)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--shape", choices=["bench", "tiny"], default="bench", help="configs/bench.yaml or configs/bench_tiny.yaml")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps")
    p.add_argument("--steps", type=int, default=3, help="timed (and profiled) steps")
    p.add_argument("--bf16", action="store_true", help="trainer precision bf16-mixed")
    p.add_argument("--torch-profile", action="store_true", help="also run torch.profiler over the timed steps")
    p.add_argument("--trace", type=Path, default=None, help="write a Chrome trace here (with --torch-profile)")
    p.add_argument("--top", type=int, default=30, help="operators to list in the profiler table")
    p.add_argument("--json", type=Path, default=None, help="write the phase table as JSON here")
    p.add_argument("--attn", choices=["sdpa", "eager"], default=None,
                   help="grpo_lab's attention kernel (default: the shape config's policy.attn_implementation)")
    args = p.parse_args(argv)

    import lightning as L
    import torch
    from lightning.pytorch.callbacks import Callback

    import grpo_lab.module as gm
    import grpo_lab.rollout as gr
    from grpo_lab.data import QueryDataModule
    from grpo_lab.module import GRPOModule
    from grpo_lab.policy import PolicyConfig, build_policy, save_policy
    from grpo_lab.warmstart import WarmStartConfig

    sys.path.insert(0, str(ROOT / "bench"))
    from run import _shape_spec  # noqa: E402

    spec = _shape_spec(args.shape)
    tmp = tempfile.mkdtemp(prefix="grpo_profile_")
    cfg = PolicyConfig(hidden_size=spec["hidden_size"], num_layers=spec["num_layers"], num_heads=spec["num_heads"],
                       intermediate_size=spec["intermediate_size"], max_positions=spec["max_positions"])
    model, tok = build_policy(cfg, seed=0)
    save_policy(model, tok, Path(tmp) / "policy")
    del model

    ph = Phases()
    # grpo_lab functions as module.py/rollout.py look them up (module globals), wrapped in this process only.
    gm.generate = ph.wrap("rollout", gm.generate)
    gm.compute_advantages = ph.wrap("advantage", gm.compute_advantages)
    gm.sequence_logprobs = ph.wrap("loss/sequence_logprobs", gm.sequence_logprobs)
    gm.policy_loss = ph.wrap("loss/policy_loss", gm.policy_loss)
    gr.token_logprobs = ph.wrap("token_logprobs (gen+loss)", gr.token_logprobs)

    L.seed_everything(0, verbose=False)
    lr = spec["lr"]
    module = GRPOModule(
        policy=PolicyConfig(pretrained=str(Path(tmp) / "policy"), attn_implementation=args.attn or spec["attn_implementation"]),
        warm_start=WarmStartConfig(steps=0),
        num_generations=spec["num_generations"], max_new_tokens=spec["completion_tokens"],
        min_new_tokens=spec["completion_tokens"], beta=0.0, max_grad_norm=spec["max_grad_norm"],
        optimizer=lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=0.0),
    )
    module.score = ph.wrap("reward", module.score)  # the training step scores through module.score
    module._log_step = ph.wrap("log_step (metrics)", module._log_step)
    clip_hook = module.on_before_optimizer_step
    marks: dict[str, float] = {}

    def timed_clip(optimizer):
        t = time.perf_counter()
        try:
            return clip_hook(optimizer)
        finally:
            marks["clip_end"] = time.perf_counter()
            ph.add("grad_norm + clip", marks["clip_end"] - t)

    module.on_before_optimizer_step = timed_clip

    fwd = module.model.forward

    @functools.wraps(fwd)
    def timed_forward(*a, **kw):
        ids = kw.get("input_ids", a[0] if a else None)
        if torch.is_grad_enabled():
            name = "model forward (train, grad)"
        elif ids is not None and ids.shape[1] == 1:
            name = "model forward (decode, 1 token)"
        else:
            name = "model forward (prefill / no-grad)"
        t = time.perf_counter()
        try:
            return fwd(*a, **kw)
        finally:
            ph.add(name, time.perf_counter() - t)

    module.model.forward = timed_forward

    class Hooks(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.t0 = time.perf_counter()

        def on_before_backward(self, trainer, pl_module, loss):
            self.tb = time.perf_counter()

        def on_after_backward(self, trainer, pl_module):
            ph.add("backward", time.perf_counter() - self.tb)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            t = time.perf_counter()
            if "clip_end" in marks:  # AdamW update + Lightning's post-step bookkeeping up to this hook
                ph.add("optimizer update (AdamW) + post-step", t - marks.pop("clip_end"))
            ph.end_step(t - self.t0)

    prof = None
    if args.torch_profile:
        from torch.profiler import ProfilerActivity, profile

        prof = profile(activities=[ProfilerActivity.CPU], record_shapes=True)  # the timed steps, all of them

    dm = QueryDataModule(dataset=spec["dataset"], prompts_per_step=spec["prompts"], num_train=4096, num_val=16)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=args.warmup + args.steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        callbacks=[Hooks()], precision="bf16-mixed" if args.bf16 else "32-true",
    )

    class _Start(Callback):  # start the profiler at the first timed step
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if prof is not None and trainer.global_step == args.warmup:
                prof.__enter__()

    trainer.callbacks.insert(0, _Start())
    trainer.fit(module, datamodule=dm)
    if prof is not None:
        prof.__exit__(None, None, None)

    timed = ph.steps[args.warmup:]
    calls = ph.step_calls[args.warmup:]
    names = sorted({k for s in timed for k in s}, key=lambda k: -statistics.median(s.get(k, 0.0) for s in timed))
    med = {k: statistics.median(s.get(k, 0.0) for s in timed) for k in names}
    total = med["step_total"]
    # derived phases
    derived = {
        "rollout: non-forward (sampling, softmax, cat, bookkeeping, decode)":
            med.get("rollout", 0) - med.get("model forward (decode, 1 token)", 0) - med.get("model forward (prefill / no-grad)", 0),
        "loss/sequence_logprobs: non-forward (log-softmax, entropy)":
            med.get("loss/sequence_logprobs", 0) - med.get("model forward (train, grad)", 0),
        "Lightning + rest (step - rollout - reward - adv - loss - log - backward - clip - opt)":
            total - sum(med.get(k, 0) for k in ("rollout", "reward", "advantage", "loss/sequence_logprobs",
                                                  "loss/policy_loss", "log_step (metrics)", "backward",
                                                  "grad_norm + clip", "optimizer update (AdamW) + post-step")),
    }
    print(f"\nshape {args.shape} ({'bf16-mixed' if args.bf16 else 'fp32'}), threads {torch.get_num_threads()}, "
          f"median over {len(timed)} timed steps; step = {total * 1000:.1f} ms "
          "(all: " + ", ".join(f"{s['step_total'] * 1000:.0f}" for s in timed) + ")")
    print(f"{'phase':<78} {'ms/step':>9} {'share':>7} {'calls':>6}")
    for k in names:
        if k == "step_total":
            continue
        c = statistics.median(cs.get(k, 0) for cs in calls)
        print(f"{k:<78} {med[k] * 1000:9.1f} {med[k] / total:7.1%} {c:6.0f}")
    for k, v in derived.items():
        print(f"{k:<78} {v * 1000:9.1f} {v / total:7.1%}")
    dec = med.get("model forward (decode, 1 token)", 0)
    ndec = statistics.median(cs.get("model forward (decode, 1 token)", 0) for cs in calls)
    if ndec:
        print(f"per decode forward: {dec / ndec * 1000:.2f} ms; per generated token position "
              f"(whole rollout / T): {med['rollout'] / spec['completion_tokens'] * 1000:.2f} ms")
    if args.json:
        args.json.write_text(json.dumps({"median_ms": {k: v * 1000 for k, v in med.items()},
                                          "derived_ms": {k: v * 1000 for k, v in derived.items()},
                                          "steps": timed, "calls": calls}, indent=2))
    if prof is not None:
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=60))
        print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=args.top,
                                                                 max_name_column_width=50, max_shapes_column_width=60))
        if args.trace:
            prof.export_chrome_trace(str(args.trace))


if __name__ == "__main__":
    main()
