"""The steps of ``bench/gpu_check.sh`` (issue 21, item 4); each runs in its own process and is recorded,
failed or not, in this order (the later ones take what is left of the budget):

0. ``pip install --no-index --find-links bench/wheels -r scripts/gpu_requirements.txt`` (real run, when the
   folder exists), with the machine's torch pinned by a constraint so nothing replaces it;
1. ``fit``: ``grpo-lab fit`` (``python -m grpo_lab.cli``) with ``precision=bf16-mixed`` for a Llama of ~113M
   matmul weights (hidden 768, 12 layers, 12 heads, MLP 3072, char vocabulary) on the arithmetic task, 50
   steps of P=16 x G=8 completions of up to 32 tokens, the device's default decode settings
   (``RLConfig.decode_settings``: on a GPU the compiled static-cache step): step time, completion tokens/s
   (goal >= 3 x 7,013) and peak memory from ``grpo_lab.train.stepstats.StepStats``; it keeps ``last.ckpt``;
2. ``profile``: ``python -m bench.gpu_profile`` on the same shape: each decode path's rollout time (the path
   before issue 21, sliced, static eager, static compiled with prompts shared and not), and the whole training
   step with ``share_prompts`` on and off, each with a ``torch.profiler`` summary of one step (top kernels,
   kernel launches, host syncs and host reads per step);
3. ``variance_probe``: ``python -m grpo_lab.variance --ckpt <step 1's last.ckpt>`` on the device, sketched
   (``--sketch-dim``) with K = 32 batches when the probe has that flag, its time and memory from its JSON;
4. ``bench``: ``python -m bench.benchmark --device cuda --shape gpu``: grpo_lab against TRL's GRPOTrainer on
   identical work (``configs/bench_gpu.yaml``), fp32 and bf16 each, as ratios within the run (goal <= 0.5);
5. ``ablate``: a smoke study (``grpo-lab-ablate --space smoke``) with 2 workers placed on the GPU
   (``--accelerator gpu --trials-per-device 2``, when grpo-lab-ablate has the flag), and the devices each
   trial recorded;
6. ``ddp``/``fsdp``: the fit (10 steps) under ``trainer.strategy`` ``ddp`` and ``fsdp`` on one device: does
   each run, and are its step-1 loss, reward and gradient norm those of step 1's fit (same seed, weights and
   samples)? fsdp runs with ``model.max_grad_norm: null``: Lightning's ``FSDPPrecision.clip_grad_by_norm``
   raises; the gradient norm is logged before any clipping, so the step-1 comparison still holds.

The reward is ``exact_match + 0.1 x digit_fraction``: from random weights exact matches are rare, so the
digit share gives every group a spread and nonzero advantages, hence a gradient the step-1 comparison can
check. (Completions are not forced to full length: with equal lengths and token_mean the μ = 1 loss is
-mean(A) = 0 whatever the weights, and comparing it would check nothing.)

``--dry-run`` runs the same steps on CPU at tiny sizes and writes the JSON to a temporary path (or ``--out``);
a real run writes ``results/gpu.json``. Every step has a time limit cut to the budget that is left.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.machine import git_commit
from grpo_lab.system.process_env import child_env

ROOT = Path(__file__).resolve().parent.parent
REAL = {"device": "cuda", "accelerator": "gpu", "precision": "bf16-mixed", "hidden_size": 768,
        "num_layers": 12, "num_heads": 12, "max_positions": 128, "prompts": 16, "generations": 8,
        "tokens": 32, "steps": 50, "strategy_steps": 10, "budget_seconds": 480,
        "bench": ["--shape", "gpu", "--steps", "5", "--warmup", "2"],
        "probe": ["--num-batches", "8", "--reference-batches", "32", "--prompts-per-batch", "8"],
        "sketch": ["--num-batches", "32", "--reference-batches", "0", "--prompts-per-batch", "8",
                   "--sketch-dim", "65536"],
        "profile": ["--repeats", "3", "--warmup", "2", "--steps", "3"],
        "ablate": ["--accelerator", "gpu", "--devices", "auto", "--trials-per-device", "2", "--n-jobs", "2"],
        "limits": {"wheels": 90, "fit": 130, "profile": 90, "probe": 75, "bench": 150, "ablate": 90,
                   "ddp": 60, "fsdp": 60}}
DRY = {"device": "cpu", "accelerator": "cpu", "precision": "bf16-mixed", "hidden_size": 32, "num_layers": 1,
       "num_heads": 2, "max_positions": 64, "prompts": 4, "generations": 4, "tokens": 4, "steps": 3,
       "strategy_steps": 2, "budget_seconds": None,
       "bench": ["--shape", "tiny", "--steps", "1", "--warmup", "1", "--no-bf16", "--matmul-size", "128",
                 "--matmul-seconds", "0.2"],
       "probe": ["--num-batches", "2", "--reference-batches", "2", "--prompts-per-batch", "2"],
       "sketch": ["--num-batches", "2", "--reference-batches", "2", "--prompts-per-batch", "2",
                  "--sketch-dim", "256"],
       "profile": ["--repeats", "1", "--warmup", "1", "--steps", "1", "--no-bf16"],
       "ablate": ["--n-jobs", "2"],
       "limits": {"wheels": 0, "fit": 300, "profile": 300, "probe": 300, "bench": 300, "ablate": 300,
                  "ddp": 300, "fsdp": 300}}
REWARDS = ["exact_match", "bench.gpu_check:digit_fraction"]
GOAL_TOKENS_PER_S = 3 * 7013  # issue 21: 3x the first H100 run's 113M fit
GOAL_RATIO = 0.5  # issue 21: grpo_lab / TRL step time, fp32 and bf16 each


def digit_fraction(completions: list[str], **_) -> list[float]:
    """The share of a completion's characters that are digits (0 for an empty one)."""
    return [sum(ch.isdigit() for ch in c) / len(c) if c else 0.0 for c in completions]


NO_CLIP = {"fsdp": "max_grad_norm null: Lightning's FSDPPrecision refuses gradient_clip_algorithm='norm'"}


def fit_config(plan: dict, work: Path, name: str, strategy: str, steps: int, checkpoint: bool) -> dict:
    """The overlay on configs/base.yaml for one fit (written as JSON, which is YAML)."""
    callbacks = [{"class_path": "grpo_lab.train.stepstats.StepStats",
                  "init_args": {"out": str(work / f"{name}.stats.json"), "skip": 1}}]
    if checkpoint:
        callbacks.append({"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                          "init_args": {"dirpath": str(work / "ckpt"), "save_last": True, "save_top_k": 0}})
    return {
        "trainer": {"accelerator": plan["accelerator"], "devices": 1, "strategy": strategy,
                    "precision": plan["precision"], "max_steps": steps, "val_check_interval": None,
                    "limit_val_batches": 0, "enable_progress_bar": False, "enable_model_summary": False,
                    "enable_checkpointing": checkpoint, "callbacks": callbacks,
                    "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                               "init_args": {"save_dir": str(work / "runs"), "name": name}}},
        "model": {"policy": {"hidden_size": plan["hidden_size"], "num_layers": plan["num_layers"],
                             "num_heads": plan["num_heads"], "max_positions": plan["max_positions"]},
                  "warm_start": {"steps": 0, "cache_dir": str(work / "warmstart")},
                  "rewards": REWARDS, "reward_weights": [1.0, 0.1],
                  "num_generations": plan["generations"], "max_new_tokens": plan["tokens"],
                  "max_grad_norm": None if strategy in NO_CLIP else 1.0},
        "data": {"dataset": "arithmetic", "prompts_per_step": plan["prompts"], "num_train": 4096,
                 "num_val": 16},
    }


def run_step(cmd: list[str], log: Path, timeout: float | None, env: dict) -> dict:
    """Run ``cmd`` from the repository root with its output in ``log``; the record of it."""
    t0 = time.perf_counter()
    rec = {"command": " ".join(cmd), "log": str(log)}
    if timeout is not None and timeout <= 5:
        return {**rec, "ok": False, "error": "skipped: the time budget is spent"}
    with log.open("w") as fh:
        try:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = None
    rec.update(wall_seconds=round(time.perf_counter() - t0, 1), returncode=rc, ok=rc == 0)
    if rc != 0:
        rec["error"] = f"timed out after {timeout:.0f} s" if rc is None else f"exit code {rc}"
        rec["log_tail"] = log.read_text(errors="replace").splitlines()[-30:]
    return rec


def fit_summary(stats_path: Path) -> dict:
    if not stats_path.is_file():
        return {}
    s = json.loads(stats_path.read_text())
    keep = ("steps", "timed_steps", "step_seconds_median", "completion_tokens_per_s", "peak_memory_gib",
            "peak_memory_kind", "parameters", "device_name", "precision", "strategy")
    metrics = s.get("metrics") or {}
    step1 = {k.split("/")[-1]: (v or [None])[0] for k, v in metrics.items()}
    return {**{k: s.get(k) for k in keep}, "step1": step1, "metrics": metrics}


def same_step1(a: dict, b: dict, tol: float = 1e-3) -> bool | None:
    """Step 1's loss, reward and gradient norm equal within ``tol`` (relative, at least absolute): the same
    samples (reward) and the same gradient. None when either run has no step 1."""
    keys = ("loss", "reward", "grad_norm")
    if any(a.get(k) is None or b.get(k) is None for k in keys):
        return None
    return all(abs(a[k] - b[k]) <= tol * max(1.0, abs(a[k]), abs(b[k])) for k in keys)


def bench_summary(path: Path) -> dict:
    if not path.is_file():
        return {}
    r = json.loads(path.read_text())
    shapes = {}
    for shape, entry in r.get("shapes", {}).items():
        peers = {k: {"ok": p.get("ok"), "seconds_per_step": (p.get("seconds_per_step") or {}).get("median"),
                     "completion_tokens_per_s": p.get("completion_tokens_per_s"),
                     "precision": p.get("precision")}
                 for k, p in entry.get("peers", {}).items()}
        shapes[shape] = {"peers": peers, "ratios": entry.get("ratios", {}), "work": entry.get("work")}
    return {"shapes": shapes, "matmul_fp32_peak_gflops": r.get("matmul", {}).get("fp32_peak_gflops_used")}


def host_info() -> dict:
    info = {"python": sys.version.split()[0]}
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            info["cuda_device"] = torch.cuda.get_device_name(0)
            info["cuda_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
    except ImportError as err:
        info["torch"] = f"not importable: {err}"
    from importlib import metadata

    for pkg in ("lightning", "transformers", "trl", "accelerate", "datasets", "jsonargparse"):
        try:
            info[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            info[pkg] = None
    return info


def install_wheels(work: Path, env: dict, timeout: float) -> dict:
    """pip from bench/wheels only, the machine's torch pinned. Two installs: what ``grpo-lab fit`` needs
    (jsonargparse) first, then the rest (TRL and its stack), so that a TRL dependency the machine cannot meet
    costs step 3 only, not every step."""
    wheels = ROOT / "bench" / "wheels"
    if not wheels.is_dir():
        return {"ok": False, "error": "no bench/wheels (run `make gpu-wheels` where PyPI is reachable)"}
    from importlib import metadata

    constraints = work / "constraints.txt"
    constraints.write_text(f"torch=={metadata.version('torch')}\n")  # never replace the machine's torch
    reqs = [line.strip() for line in (ROOT / "scripts" / "gpu_requirements.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    core = [r for r in reqs if r.startswith("jsonargparse")]
    pip = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(wheels), "-c",
           str(constraints)]
    t0 = time.perf_counter()
    rec = run_step([*pip, *core], work / "pip_core.log", timeout, env)
    rest = run_step([*pip, *[r for r in reqs if r not in core]], work / "pip.log",
                    timeout - (time.perf_counter() - t0), env)
    return {**rest, "ok": rec["ok"] and rest["ok"], "core": rec}


def has_flag(module: str, flag: str, env: dict) -> bool:
    """Whether ``python -m module --help`` lists ``flag`` (steps that call work in progress check first)."""
    try:
        out = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return False
    return flag in out.stdout


def profile_step(plan: dict, work: Path, env: dict, timeout: float | None) -> dict:
    """Step 2: ``bench.gpu_profile`` on the fit's shape (decode paths, the step both ways, the profiler)."""
    out = work / "profile.json"
    cmd = [sys.executable, "-m", "bench.gpu_profile", "--device", plan["device"],
           "--hidden-size", str(plan["hidden_size"]), "--num-layers", str(plan["num_layers"]),
           "--num-heads", str(plan["num_heads"]), "--max-positions", str(plan["max_positions"]),
           "--prompts", str(plan["prompts"]), "--generations", str(plan["generations"]),
           "--tokens", str(plan["tokens"]), *plan["profile"], "--out", str(out)]
    rec = run_step(cmd, work / "profile.log", timeout, env)
    if out.is_file():
        rec.update({k: v for k, v in json.loads(out.read_text()).items() if k in ("rollout", "step")})
    return rec


def probe_step(plan: dict, work: Path, env: dict, timeout: float | None, ckpt: Path) -> dict:
    """Step 3: the gradient-variance probe at step 1's checkpoint, sketched when the probe can."""
    if not ckpt.is_file():
        return {"ok": False, "error": "no checkpoint from step 1"}
    sketched = has_flag("grpo_lab.variance", "--sketch-dim", env)
    args = plan["sketch"] if sketched else plan["probe"]
    out = work / "probe.json"
    cmd = [sys.executable, "-m", "grpo_lab.variance", "--ckpt", str(ckpt), "--device", plan["device"], *args,
           "--quiet", "--out", str(out)]
    rec = {**run_step(cmd, work / "probe.log", timeout, env), "sketched": sketched}
    if out.is_file():
        probe = json.loads(out.read_text())
        rec.update(results=probe.get("results"), cost=probe.get("cost"))
    if not sketched:
        rec["todo"] = "grpo_lab.variance has no --sketch-dim yet: the exact probe ran (issue 21, item 3)"
    return rec


STUDY_DEVICES = """import json, sys, optuna
s = optuna.load_study(study_name=sys.argv[2], storage=sys.argv[1])
print(json.dumps([{"number": t.number, "state": t.state.name, "accelerator": t.user_attrs.get("accelerator"),
                   "devices": t.user_attrs.get("devices")} for t in s.trials]))"""


def ablate_step(plan: dict, work: Path, env: dict, timeout: float | None) -> dict:
    """Step 5: the smoke study with 2 workers (on the GPU when grpo-lab-ablate can place trials), and the
    devices each trial recorded. The trials decode eagerly (TORCHDYNAMO_DISABLE=1): this step checks where
    trials run, and a compilation per trial would cost most of its time limit."""
    placed = plan["device"] == "cuda" and has_flag("ablations.run", "--trials-per-device", env)
    args = plan["ablate"] if placed else ["--n-jobs", "2"]
    root = work / "ablate"
    cmd = [sys.executable, "-m", "ablations.run", "--space", "smoke", "--root", str(root), "--no-probe",
           "--no-report", *args]
    rec = {**run_step(cmd, work / "ablate.log", timeout, {**env, "TORCHDYNAMO_DISABLE": "1"}),
           "placed_on_gpu": placed}
    db = root / "ablate" / "smoke.db"
    if db.is_file():
        try:
            got = subprocess.run([sys.executable, "-c", STUDY_DEVICES, f"sqlite:///{db}", "smoke"], cwd=ROOT,
                                 env=env, capture_output=True, text=True, timeout=60)
            rec["trials"] = json.loads(got.stdout) if got.returncode == 0 else got.stderr[-2000:]
        except (subprocess.TimeoutExpired, json.JSONDecodeError) as err:
            rec["trials"] = f"not read: {err}"
    if plan["device"] == "cuda" and not placed:
        rec["todo"] = "grpo-lab-ablate has no --accelerator gpu yet: the trials ran as their config says"
    return rec


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/gpu_check.sh", description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true",
                   help="the same steps on CPU at tiny sizes (a test runs this)")
    p.add_argument("--out", type=Path, default=None,
                   help="results JSON (default: results/gpu.json; with --dry-run a temporary path)")
    p.add_argument("--workdir", type=Path, default=None,
                   help="logs, stats and checkpoints (default: runs/gpu_check, or a temp dir with --dry-run)")
    p.add_argument("--skip", default="",
                   help="comma-separated steps to leave out: wheels, fit, profile, probe, bench, ablate, "
                        "ddp, fsdp")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for all steps (default 480 on a GPU, none in a dry run); each step's limit "
                        "is cut to what is left")
    p.add_argument("--probe-batches", type=int, default=None,
                   help="the probe's K batches and reference batches (default 8 and 32 on a GPU); each "
                        "batch's gradients are float64 rows of every parameter, kept on the CPU")
    args = p.parse_args(argv)
    dry = args.dry_run or os.environ.get("GPU_CHECK_DRY_RUN") == "1"
    plan = DRY if dry else REAL
    if args.budget is not None:
        plan = {**plan, "budget_seconds": args.budget}
    if args.probe_batches is not None:
        k = str(args.probe_batches)
        plan = {**plan, "probe": ["--num-batches", k, "--reference-batches", k, *plan["probe"][4:]],
                "sketch": ["--num-batches", k, *plan["sketch"][2:]],
                "limits": {**plan["limits"], "probe": 170}}
    work = args.workdir or (Path(tempfile.mkdtemp(prefix="gpu_check_")) if dry
                            else ROOT / "runs" / "gpu_check")
    work.mkdir(parents=True, exist_ok=True)
    out = args.out or (work / "gpu_results.json" if dry else ROOT / "results" / "gpu.json")
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    pythonpath = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env = child_env(PYTHONPATH=pythonpath, PYTHONWARNINGS="ignore")
    t_start = time.perf_counter()

    def limit(step: str) -> float | None:
        cap = plan["limits"][step]
        if plan["budget_seconds"] is None:
            return cap
        return min(cap, plan["budget_seconds"] - (time.perf_counter() - t_start))

    results: dict = {"schema": 1, "dry_run": dry,
                     "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                     "git_commit": git_commit(), "plan": {k: v for k, v in plan.items() if k != "limits"},
                     "rewards": {"names": REWARDS, "weights": [1.0, 0.1]}, "workdir": str(work)}
    if not dry and "wheels" not in skip:
        results["wheels"] = install_wheels(work, env, limit("wheels"))
    results["host"] = host_info()

    def fit(name: str, strategy: str, steps: int, checkpoint: bool) -> dict:
        cfg = work / f"{name}.yaml"
        cfg.write_text(json.dumps(fit_config(plan, work, name, strategy, steps, checkpoint), indent=1))
        cmd = [sys.executable, "-m", "grpo_lab.cli", "fit", "--config", str(cfg)]
        rec = run_step(cmd, work / f"{name}.log", limit(name), env)
        # a port taken between pick and bind
        if not rec["ok"] and "EADDRINUSE" in "\n".join(rec.get("log_tail", [])):
            rec = {**run_step(cmd, work / f"{name}.log", limit(name), env), "retried": "EADDRINUSE"}
        return {**rec, **fit_summary(work / f"{name}.stats.json")}

    if "fit" not in skip:
        results["fit"] = fit("fit", "auto", plan["steps"], checkpoint=True)
        results["fit"]["goal_completion_tokens_per_s"] = GOAL_TOKENS_PER_S
    if "profile" not in skip:
        results["profile"] = profile_step(plan, work, env, limit("profile"))
    ckpt = work / "ckpt" / "last.ckpt"
    if "probe" not in skip:
        results["variance_probe"] = probe_step(plan, work, env, limit("probe"), ckpt)
    if "bench" not in skip:
        peers = "grpo_lab,trl" if importlib.util.find_spec("trl") else "grpo_lab"
        cmd = [sys.executable, "-m", "bench.benchmark", "--device", plan["device"], *plan["bench"],
               "--peers", peers, "--no-rss-fit", "--wait-quiet", "0", "--out", str(work / "bench.json")]
        results["bench"] = {**run_step(cmd, work / "bench.log", limit("bench"), env), "peers": peers,
                            "goal_ratio_at_most": GOAL_RATIO, **bench_summary(work / "bench.json")}
    if "ablate" not in skip:
        results["ablate"] = ablate_step(plan, work, env, limit("ablate"))
    base = results.get("fit", {}).get("step1", {})
    results["strategies"] = {}
    for strategy in ("ddp", "fsdp"):
        if strategy in skip:
            continue
        rec = fit(strategy, strategy, plan["strategy_steps"], checkpoint=False)
        rec["same_step1_as_fit"] = same_step1(base, rec.get("step1", {}))
        if strategy in NO_CLIP:
            rec["note"] = NO_CLIP[strategy]
        if dry and not rec["ok"] and "requires a GPU accelerator" in "\n".join(rec.get("log_tail", [])):
            rec["expected_on_cpu"] = "Lightning's FSDPStrategy refuses accelerator=cpu"
        results["strategies"][strategy] = rec
    results["total_seconds"] = round(time.perf_counter() - t_start, 1)
    steps = [results.get(k) for k in ("fit", "profile", "variance_probe", "bench", "ablate")]
    steps += list(results["strategies"].values())
    results["all_ok"] = all(s.get("ok") or s.get("expected_on_cpu") or s.get("todo")
                            for s in steps if s is not None)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out} ({'all steps ran' if results['all_ok'] else 'some steps failed'}; "
          f"{results['total_seconds']:.0f} s)")
    return 0 if results["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
