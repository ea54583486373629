"""The decode paths timed against each other, and ``torch.profiler`` over one training step (a step of
``bench/gpu_check.sh``; runs on CPU too): ``python -m bench.gpu_profile --device cuda --out profile.json``.

1. ``rollout``: the same fixed-length rollout (P x G completions of exactly T tokens, a random Llama of the
   given sizes) with each decode path of ``grpo_lab/decode.py``: the path before issue 21 (growing cache,
   a stop check per token, prompts shared), the sliced cache, the static cache eager, and the static cache
   compiled (the GPU default) with prompts shared and not. Per path: the first call's seconds (a compiled
   step compiles there), the median of the next ones, completion tokens/s, and whether its tokens equal the
   first path's under the same seed.
2. ``step``: ``grpo_lab``'s whole training step (Lightning, ``bench.work``'s module: beta = 0, AdamW,
   clipping) with the device's default decode settings, prompts shared and not (``share_prompts``, both
   ways): the median step seconds, and over one profiled step the top kernels by self device time (CPU
   operators on a CPU), kernel launches (``cudaLaunchKernel``/``cuLaunchKernel``; ``cudaGraphLaunch``
   counted apart), host synchronizations (``cuda*Synchronize``) and host reads of a device value
   (``aten::_local_scalar_dense``: every ``.item()``/``bool()``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from grpo_lab.system.process_env import configure_process

SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")


def decode_paths(device: str) -> dict:
    """The decode settings compared, by name."""
    from grpo_lab.decode import DecodeSettings

    default = DecodeSettings.for_device(device)
    return {
        "before: dynamic cache, stop check per token, prompts shared": DecodeSettings("dynamic"),
        "sliced cache (CPU default)": DecodeSettings("sliced"),
        "static cache, eager": DecodeSettings("static", False, stop_check_every=8, share_prompts=False),
        f"device default ({default.kv_cache}, compile={default.compile})": default,
        "device default, prompts shared": DecodeSettings(default.kv_cache, default.compile,
                                                         default.compile_backend, default.stop_check_every,
                                                         True),
    }


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def time_rollouts(args, model, tok, prompts: list[str]) -> dict:
    import torch

    from grpo_lab.decode import Decoder
    from grpo_lab.rollout import generate

    out, first_ids = {}, None
    for name, settings in decode_paths(args.device).items():
        dec = Decoder(settings, args.device)
        seconds = []
        for i in range(args.repeats + 1):
            torch.manual_seed(i)
            sync(args.device)
            t0 = time.perf_counter()
            with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.bf16):
                r = generate(model, tok, prompts, args.generations, args.tokens, 1.0,
                             min_new_tokens=args.tokens, decoder=dec)
            sync(args.device)
            seconds.append(time.perf_counter() - t0)
            if i == 0:
                ids = r.completion_ids.cpu()
                first_ids = ids if first_ids is None else first_ids
                same = bool((ids == first_ids).all())
        med = statistics.median(seconds[1:])
        out[name] = {"settings": asdict(settings),
                     "first_call_seconds": round(seconds[0], 3), "seconds_median": round(med, 4),
                     "completion_tokens_per_s": round(r.num_tokens / med, 1),
                     "same_tokens_as_first_path": same, "compiled": dec.compiled is not None}
    return out


def profile_summary(prof, device: str, top: int) -> dict:
    """Top kernels (CUDA) or operators (CPU) of one profiled step, and its launches, syncs, host reads."""
    events = prof.key_averages()
    counts = {e.key: e.count for e in events}
    attr = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    rows = [e for e in events if device != "cuda" or getattr(e, attr, 0) > 0]
    rows.sort(key=lambda e: -getattr(e, attr, 0))
    total = sum(getattr(e, attr, 0) for e in rows) or 1
    return {
        "top": [{"name": e.key[:120], "calls": e.count, "self_ms": round(getattr(e, attr, 0) / 1000, 3),
                 "share": round(getattr(e, attr, 0) / total, 4)} for e in rows[:top]],
        "time_kind": attr,
        "kernel_launches": sum(counts.get(k, 0) for k in LAUNCHES),
        "graph_launches": counts.get("cudaGraphLaunch", 0),
        "host_syncs": sum(counts.get(k, 0) for k in SYNCS),
        "host_reads": counts.get("aten::_local_scalar_dense", 0),
        "device_to_host_copies": counts.get("Memcpy DtoH (Device -> Pageable)", 0)
        + counts.get("Memcpy DtoH (Device -> Pinned)", 0),
    }


def time_steps(args, model_dir: Path, share: bool) -> dict:
    """Lightning steps of grpo_lab's module with ``share_prompts=share``: median seconds of the steps after
    ``--warmup``, and the profile of the last one."""
    import lightning as L
    import torch
    from torch.profiler import ProfilerActivity, profile

    from bench.work import grpo_module, grpo_trainer, query_data

    spec = {"lr": 5e-4, "attn_implementation": "sdpa", "num_generations": args.generations,
            "completion_tokens": args.tokens, "temperature": 1.0, "max_grad_norm": 1.0,
            "dataset": "arithmetic", "prompts": args.prompts}
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    prof = profile(activities=activities)
    total = args.warmup + args.steps

    class Timer(L.Callback):
        def __init__(self) -> None:
            self.seconds: list[float] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            sync(args.device)
            if trainer.global_step == total - 1:
                prof.__enter__()
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            sync(args.device)
            self.seconds.append(time.perf_counter() - self.t0)
            if trainer.global_step == total:
                prof.__exit__(None, None, None)

    L.seed_everything(0, verbose=False)
    module = grpo_module(spec, model_dir, share_prompts=share)
    timer = Timer()
    trainer = grpo_trainer(total, [timer], args.bf16, args.device)
    trainer.fit(module, datamodule=query_data(spec))
    timed = timer.seconds[args.warmup:]
    return {"share_prompts": share, "decode": asdict(module.decoder.settings),
            "step_seconds_median": round(statistics.median(timed), 4), "step_seconds": timed,
            "first_step_seconds": round(timer.seconds[0], 3),
            "profile_of_last_step": profile_summary(prof, args.device, args.top),
            "torch_threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_profile", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                   help="bf16 autocast / precision=bf16-mixed, as the fit of step 1")
    p.add_argument("--hidden-size", type=int, default=768)
    p.add_argument("--num-layers", type=int, default=12)
    p.add_argument("--num-heads", type=int, default=12)
    p.add_argument("--max-positions", type=int, default=128)
    p.add_argument("--prompts", type=int, default=16, help="P")
    p.add_argument("--generations", type=int, default=8, help="G")
    p.add_argument("--tokens", type=int, default=32, help="T, every completion exactly this long")
    p.add_argument("--repeats", type=int, default=3, help="timed rollouts per decode path")
    p.add_argument("--warmup", type=int, default=2, help="untimed training steps")
    p.add_argument("--steps", type=int, default=3, help="timed training steps (the last one profiled)")
    p.add_argument("--top", type=int, default=15, help="kernels listed")
    p.add_argument("--skip", default="", help="comma-separated parts to leave out: rollout, step")
    p.add_argument("--out", type=Path, default=Path("profile.json"))
    args = p.parse_args(argv)
    configure_process()
    import torch

    from grpo_lab.data.tasks import load_queries
    from grpo_lab.model.policy import PolicyConfig, build_policy, save_policy

    skip = set(args.skip.split(","))
    cfg = PolicyConfig(hidden_size=args.hidden_size, num_layers=args.num_layers, num_heads=args.num_heads,
                       max_positions=args.max_positions)
    model, tok = build_policy(cfg, seed=0)
    model_dir = Path(tempfile.mkdtemp(prefix="gpu_profile_")) / "policy"
    save_policy(model, tok, model_dir)
    result: dict = {"device": args.device, "bf16": args.bf16, "shape": vars(args) | {"out": str(args.out)},
                    "parameters": sum(p.numel() for p in model.parameters())}
    if "rollout" not in skip:
        model = model.to(args.device).eval()
        prompts = [q["prompt"] for q in load_queries("arithmetic", args.prompts, 0)]
        with torch.no_grad():
            result["rollout"] = time_rollouts(args, model, tok, prompts)
        del model
    if "step" not in skip:
        result["step"] = {"prompts_shared": time_steps(args, model_dir, True),
                          "prompts_not_shared": time_steps(args, model_dir, False)}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
