"""Does a GPU fit under ``ddp`` take the single-device fit's step 1? (the RNG check of 2026-11-26)

    python3 -m bench.gpu_ddp_step1          # on the GPU machine, bench/wheels carried (docs/gpu.md)

Six 2-step fits of the GPU check's 113M Llama (``bench.gpu_check``'s plan and overlay): fp32 and
bf16-mixed, each single-device, ``ddp`` and ``fsdp`` on the one GPU (``GPU_CHECK_DRY_RUN=1``: the CPU's
tiny plan, without fsdp). A callback fingerprints, before each of the first
two batches, the weights (sum), the CUDA and CPU generator states (md5) and the batch (md5); the results go
to ``$OUT/gpu_ddp_step1.json`` (or ``runs/gpu_ddp_step1``). Before ``grpo_lab/system/rng.py`` the ddp runs had
the same weights, batch and CPU state as the single-device ones but another CUDA state (the policy's init
re-seeded every CUDA generator; Lightning's ddp setup re-seeds them again), so step 1 sampled other
completions; after it, step 1's loss, reward and gradient norm are equal (``results/gpu_ddp_step1.json``).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import lightning.pytorch as pl

PRECISIONS = ("32-true", "bf16-mixed")
STRATEGIES = ("auto", "ddp", "fsdp")  # fsdp: GPU only (Lightning refuses it on a CPU)


class Fingerprint(pl.Callback):
    """Appends one JSON line per batch (the first two) to ``out``: what step 1 depends on."""

    def __init__(self, out: str) -> None:
        self.out = out

    def on_train_batch_start(self, trainer, module, batch, batch_idx: int) -> None:
        if batch_idx > 1:
            return
        import torch

        def md5(t) -> str:
            return hashlib.md5(t.numpy().tobytes()).hexdigest()

        rec = {"batch_idx": batch_idx,
               "param_sum": float(sum(p.detach().double().sum() for p in module.model.parameters())),
               "cuda_rng": md5(torch.cuda.get_rng_state()) if torch.cuda.is_available() else None,
               "cpu_rng": md5(torch.get_rng_state()),
               "batch": hashlib.md5(json.dumps(batch, sort_keys=True, default=str).encode()).hexdigest(),
               "wrapper": type(trainer.strategy.model).__name__}
        with open(self.out, "a") as fh:
            fh.write(json.dumps(rec) + "\n")


def main() -> None:
    from bench import gpu_check as g

    out = Path(os.environ.get("OUT") or "runs/gpu_ddp_step1")
    work = Path("runs/gpu_ddp_step1_work")
    work.mkdir(parents=True, exist_ok=True)
    env = g.child_env(PYTHONPATH=str(g.ROOT), PYTHONWARNINGS="ignore")
    plan0 = g.DRY if os.environ.get("GPU_CHECK_DRY_RUN") == "1" else g.REAL
    if plan0 is g.REAL:
        print("wheels", g.install_wheels(work, env, 90).get("ok"), flush=True)
    res = {}
    for prec in PRECISIONS:
        for strat in STRATEGIES if plan0 is g.REAL else STRATEGIES[:2]:
            name = f"{prec}_{strat}"
            cfg = g.fit_config({**plan0, "precision": prec}, work, name, strat, 2, checkpoint=False)
            fp = work / f"{name}.fp.jsonl"
            fp.unlink(missing_ok=True)
            cfg["trainer"]["callbacks"].append({"class_path": "bench.gpu_ddp_step1.Fingerprint",
                                                "init_args": {"out": str(fp)}})
            path = work / f"{name}.yaml"
            path.write_text(json.dumps(cfg))
            t0 = time.time()
            rec = g.run_step([sys.executable, "-m", "grpo_lab.cli", "fit", "--config", str(path)],
                             work / f"{name}.log", 120, env)
            s = g.fit_summary(work / f"{name}.stats.json")
            res[name] = {"ok": rec["ok"], "seconds": round(time.time() - t0), "step1": s.get("step1"),
                         "fingerprints": [json.loads(x) for x in fp.read_text().splitlines()]
                         if fp.is_file() else [], "log_tail": rec.get("log_tail", [])[-8:]}
            print(name, res[name]["ok"], res[name]["step1"], flush=True)
    for prec in PRECISIONS:  # exactly equal (tol 0) to the single-device fit's step 1?
        for strat in STRATEGIES[1:]:
            if f"{prec}_{strat}" in res:
                res[f"{prec}_{strat}_same_step1"] = g.same_step1(res[f"{prec}_auto"].get("step1") or {},
                                                                 res[f"{prec}_{strat}"].get("step1") or {},
                                                                 tol=0.0)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_ddp_step1.json").write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
