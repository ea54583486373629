"""``make bench``: grpo_lab's GRPO step against TRL's ``GRPOTrainer`` on identical work, on this machine.

One run:

1. measures the machine's matmul throughput (fp32 and bf16, square ``--matmul-size`` matrices, with the
   torch thread count the fits use): the fp32 peak is the FLOP limit results are expressed against;
2. for each shape (``configs/bench.yaml``, ``configs/bench_tiny.yaml``) builds one random policy
   (``grpo_lab.policy.build_policy(..., seed=0)``, saved as a local HF directory that both peers load) and
   times ``--warmup`` + ``--steps`` full training steps of each peer, each peer in its own process
   (``bench/peers.py``) so its peak RSS is its own; with ``--bf16`` also grpo_lab under
   ``precision=bf16-mixed``;
3. with ``--rss-fit`` measures the peak RSS of a ``configs/tiny.yaml`` fit (``/usr/bin/time -f %M``);
4. writes ``--out`` (default ``bench/results.json``) and prints a table with the project's targets.

Every number is measured; the machine has few cores and may be shared: the load of other processes
during each timed step is measured and reported next to the times (``other_load_cores``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {"bench": ROOT / "configs" / "bench.yaml", "tiny": ROOT / "configs" / "bench_tiny.yaml",
          "gpu": ROOT / "configs" / "bench_gpu.yaml"}  # gpu: the bench shape scaled up, for --device cuda
PEERS = ("grpo_lab", "trl")
TARGETS_DOC = {
    "bench_fp32_ratio": ("bench shape, fp32: grpo_lab s/step / TRL s/step", 0.6),
    "bench_bf16_ratio": ("bench shape: grpo_lab bf16-mixed s/step / TRL fp32 s/step", 0.35),
    "tiny_fp32_ratio": ("tiny shape, fp32: grpo_lab s/step / TRL s/step", 0.35),
    "tiny_fit_peak_rss_gib": ("peak RSS of `grpo-lab fit --config configs/tiny.yaml`, GiB", 1.5),
}
FLOP_FORMULA = (
    "N = L*(4*h^2 + 3*h*I) + h*V (weights used in matmuls: q,k,v,o, gate/up/down, LM head; embedding lookup "
    "excluded); per sequence with padded prompt length Tp and T completion tokens, S = Tp + T: "
    "generation (KV cache: prefill of Tp tokens, then T-1 one-token forwards) = 2*N*(Tp + T - 1) "
    "+ attention 4*L*h*(Tp^2 + sum_{j=1..T-1}(Tp + j)); training forward+backward = 6*N*S "
    "+ attention 3*4*L*h*S^2 (dense, as SDPA computes it); times B = P*G sequences. "
    "fraction of FLOP limit = (FLOPs per step / fp32 peak FLOP/s) / measured seconds per step."
)


# ---- helpers --------------------------------------------------------------------------------------------
def _shape_spec(name: str) -> dict:
    """The work of one shape, read from its config (the one source for both peers)."""
    import yaml

    cfg = yaml.safe_load(SHAPES[name].read_text())
    model, data = cfg["model"], cfg.get("data", {})
    pol = model["policy"]
    opt = model.get("optimizer", {}).get("init_args", {})
    spec = {
        "shape": name,
        "config": str(SHAPES[name].relative_to(ROOT)),
        "hidden_size": pol["hidden_size"],
        "num_layers": pol["num_layers"],
        "num_heads": pol["num_heads"],
        "intermediate_size": pol.get("intermediate_size") or 4 * pol["hidden_size"],
        "max_positions": pol.get("max_positions", 128),
        "attn_implementation": pol.get("attn_implementation", "sdpa"),  # grpo_lab's kernel; TRL keeps its default
        "num_generations": model["num_generations"],
        "completion_tokens": model["max_new_tokens"],
        "temperature": model.get("temperature", 1.0),
        "beta": model.get("beta", 0.0),
        "num_iterations": model.get("num_iterations", 1),
        "max_grad_norm": model.get("max_grad_norm", 1.0),
        "lr": opt.get("lr", 5e-4),
        "dataset": data.get("dataset", "arithmetic"),
        "prompts": data.get("prompts_per_step", 8),
    }
    if model.get("min_new_tokens") != model["max_new_tokens"]:
        raise ValueError(f"{spec['config']}: min_new_tokens must equal max_new_tokens (fixed-length work)")
    if spec["beta"] != 0.0 or spec["num_iterations"] != 1:
        raise ValueError(f"{spec['config']}: the benchmark compares beta=0, num_iterations=1")
    return spec


def estimate_flops(spec: dict, prompt_len: float, vocab: int) -> dict:
    """FLOPs of one step (see FLOP_FORMULA)."""
    h, L, inter = spec["hidden_size"], spec["num_layers"], spec["intermediate_size"]
    T, B = spec["completion_tokens"], spec["prompts"] * spec["num_generations"]
    tp = prompt_len
    n = L * (4 * h * h + 3 * h * inter) + h * vocab
    s = tp + T
    gen = 2 * n * (tp + T - 1) + 4 * L * h * (tp * tp + sum(tp + j for j in range(1, T)))
    train = 6 * n * s + 12 * L * h * s * s
    return {
        "n_matmul_params": n,
        "generation_flops": B * gen,
        "training_flops": B * train,
        "total_flops": B * (gen + train),
        "prompt_padded_length": tp,
    }


def matmul_gflops(dtype_name: str, size: int, threads: int, seconds: float, device: str = "cpu") -> dict:
    """GFLOP/s of ``size``^3 matmuls on ``device``: best and median over ~10 timed windows (after a warm-up)."""
    import torch

    torch.set_num_threads(threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=gen).to(device=device, dtype=dtype)
    out = torch.empty(size, size, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    flop = 2.0 * size**3
    t0 = time.perf_counter()
    reps = 0
    while time.perf_counter() - t0 < max(0.3, seconds / 10):  # warm-up, and sizes the windows
        torch.mm(a, b, out=out)
        sync()
        reps += 1
    per = (time.perf_counter() - t0) / reps
    k = max(1, int(seconds / 10 / per))
    rates = []
    for _ in range(10):
        t = time.perf_counter()
        for _ in range(k):
            torch.mm(a, b, out=out)
        sync()
        rates.append(flop * k / (time.perf_counter() - t) / 1e9)
    return {
        "dtype": dtype_name,
        "device": device,
        "size": size,
        "threads": threads,
        "peak_gflops": max(rates),
        "median_gflops": statistics.median(rates),
        "windows_gflops": rates,
    }


def _quantiles(xs: list[float]) -> dict:
    xs = sorted(xs)
    q = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else [xs[0]] * 3
    return {
        "median": statistics.median(xs),
        "min": xs[0],
        "max": xs[-1],
        "q1": q[0],
        "q3": q[2],
        "iqr": q[2] - q[0],
    }


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("torch", "trl", "transformers", "lightning", "accelerate", "datasets", "grpo_lab"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def _machine(threads: int) -> dict:
    info = {"cpu_model": None, "logical_cpus": os.cpu_count(), "torch_threads": threads, "flags": []}
    try:
        text = Path("/proc/cpuinfo").read_text()
        for line in text.splitlines():
            if line.startswith("model name") and info["cpu_model"] is None:
                info["cpu_model"] = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                info["flags"] = sorted(f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16") if f in flags)
                break
    except OSError:
        pass
    try:
        import torch

        info["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        if torch.cuda.is_available():
            info["cuda_device"] = torch.cuda.get_device_name(0)
            info["cuda_version"] = torch.version.cuda
    except Exception:  # noqa: BLE001
        pass
    return info


def _git_commit() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _others_load(window: float = 2.0) -> float:
    """Cores used by other processes (and hypervisor steal) over ``window`` seconds while this one sleeps."""
    import psutil

    def snap():
        t = psutil.cpu_times()
        busy = t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)
        busy += getattr(t, "steal", 0.0)
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return busy, ru.ru_utime + ru.ru_stime, time.perf_counter()

    a = snap()
    time.sleep(window)
    b = snap()
    return max(0.0, ((b[0] - a[0]) - (b[1] - a[1])) / (b[2] - a[2]))


def wait_for_quiet(max_wait: float, threshold: float, console) -> dict:
    """Wait (up to ``max_wait`` s) until other processes use less than ``threshold`` cores; the record of it."""
    t0 = time.perf_counter()
    load = _others_load()
    said = False
    while load >= threshold and time.perf_counter() - t0 < max_wait:
        if not said:
            console.print(f"  [yellow]other processes use {load:.2f} cores; waiting up to {max_wait:.0f} s for "
                          f"< {threshold} ...[/yellow]")
            said = True
        load = _others_load()
    return {"others_load_cores": load, "waited_seconds": time.perf_counter() - t0, "quiet": load < threshold}


def _busiest_others(limit: int = 3) -> list[str]:
    """The busiest other processes right now (for the contention note)."""
    import psutil

    mine = {os.getpid()}
    procs = []
    for p in psutil.process_iter(["pid", "name", "cmdline"]):
        if p.info["pid"] in mine:
            continue
        try:
            p.cpu_percent(None)
            procs.append(p)
        except psutil.Error:
            pass
    time.sleep(1.0)
    rows = []
    for p in procs:
        try:
            cpu = p.cpu_percent(None)
        except psutil.Error:
            continue
        if cpu >= 5.0:
            cmd = " ".join(p.info["cmdline"] or [p.info["name"] or "?"])[:100]
            rows.append((cpu, f"{cpu:.0f}% pid {p.info['pid']}: {cmd}"))
    return [r for _, r in sorted(rows, reverse=True)[:limit]]


def _run_peer(peer: str, spec: dict, workdir: Path) -> dict:
    """Run bench/peers.py for one peer and shape in a fresh process; its result, or an error."""
    tag = f"{peer}{'_bf16' if spec['bf16'] else ''}_{spec['shape']}"
    spec_path, out_path, log_path = (workdir / f"{tag}.{ext}" for ext in ("spec.json", "result.json", "log"))
    spec_path.write_text(json.dumps({**spec, "peer": peer}))
    env = {
        **os.environ,
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONWARNINGS": "ignore",
    }
    cmd = [sys.executable, str(ROOT / "bench" / "peers.py"), str(spec_path), str(out_path)]
    t0 = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not out_path.is_file():
        tail = log_path.read_text().splitlines()[-25:]
        return {"ok": False, "error": f"exit code {proc.returncode}", "log_tail": tail, "wall_seconds": wall}
    result = json.loads(out_path.read_text())
    result["ok"] = True
    result["peak_rss_mb_wait4"] = usage.ru_maxrss / 1024.0
    return result


def _summarize(raw: dict, spec: dict, warmup: int, flops: dict | None, peak_fp32_gflops: float | None) -> dict:
    if not raw.get("ok"):
        return raw
    times = raw["step_seconds"]
    loads = raw.get("other_load_cores", [0.0] * len(times))
    timed, timed_loads = times[warmup:], loads[warmup:]
    T = spec["completion_tokens"]
    B = spec["prompts"] * spec["num_generations"]
    lengths = [x for step in raw["completion_lengths"] for x in step]
    s = _quantiles(timed)
    out = {
        "ok": True,
        "precision": raw["precision"],
        "seconds_per_step": s,
        "timed_steps": timed,
        "warmup_steps": times[:warmup],
        "cpu_seconds_per_step": _quantiles(raw["cpu_seconds"][warmup:]) if raw.get("cpu_seconds") else None,
        "completion_tokens_per_step": B * T,
        "completion_tokens_per_s": B * T / s["median"],
        "completion_lengths_all_equal_T": bool(lengths) and all(x == T for x in lengths),
        "completion_length_min_max": [min(lengths), max(lengths)] if lengths else None,
        "rollouts_seen": len(raw["completion_lengths"]),
        "peak_rss_mb": raw["peak_rss_mb"],
        "other_load_cores_timed": timed_loads,
        "other_load_cores_max": max(timed_loads) if timed_loads else None,
        "seconds_per_step_quiet_steps": (
            _quantiles(quiet) if len(quiet := [t for t, x in zip(timed, timed_loads, strict=False) if x < 0.25]) >= 3
            else None
        ),
        "threads": raw["threads"],
        "wall_seconds_process": raw["wall_seconds"],
        "n_params": raw["n_params"],
        "model_dtype": raw["model_dtype"],
        "attn_implementation": raw["attn_implementation"],
        "optimizer": raw.get("optimizer"),
    }
    for key in ("loss_type", "scale_rewards", "ref_model", "gradient_checkpointing", "quiet_before_start"):
        if key in raw:
            out[key] = raw[key]
    if flops is not None and peak_fp32_gflops:
        limit = flops["total_flops"] / (peak_fp32_gflops * 1e9)
        out["flop_limit_seconds"] = limit
        out["fraction_of_flop_limit"] = limit / s["median"]
        out["achieved_gflops"] = flops["total_flops"] / s["median"] / 1e9
    return out


def _rss_fit(steps: int) -> dict:
    """Peak RSS of a configs/tiny.yaml fit, measured by /usr/bin/time -f %M (KiB) in its own process."""
    exe = Path(sys.executable).parent / "grpo-lab"
    save_dir = tempfile.mkdtemp(prefix="benchrss_")
    tfile = Path(save_dir) / "time.txt"
    args = [str(exe), "fit", "--config", "configs/tiny.yaml", "--trainer.max_steps", str(steps),
            "--trainer.logger.init_args.save_dir", save_dir]
    timer = shutil.which("time") if not Path("/usr/bin/time").is_file() else "/usr/bin/time"
    cmd = [timer, "-f", "%M", "-o", str(tfile), *args] if timer else args
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    t0 = time.perf_counter()
    try:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        output = proc.stdout.read()
        code = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        if code != 0:
            return {"ok": False, "error": f"exit code {code}", "log_tail": output.splitlines()[-25:]}
        if timer and tfile.is_file():
            kib, how = float(tfile.read_text().strip().splitlines()[-1]), "/usr/bin/time -f %M"
        else:
            kib, how = float(usage.ru_maxrss), "os.wait4 ru_maxrss (no /usr/bin/time)"
        return {
            "ok": True,
            "peak_rss_mb": kib / 1024.0,
            "peak_rss_gib": kib / 1024.0**2,
            "how": how,
            "command": " ".join(args[:1] + ["fit", *args[2:-1]] + ["<tmpdir>"]),
            "wall_seconds": wall,
            "note": "includes building the supervised warm start when runs/warmstart has no cached copy",
        }
    finally:
        shutil.rmtree(save_dir, ignore_errors=True)


# ---- main -----------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench/run.py",
        description="Time grpo_lab's full GRPO training step against TRL's GRPOTrainer on identical work "
        "(configs/bench.yaml, configs/bench_tiny.yaml), relative to this machine's matmul peak; write JSON.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--shape", choices=["bench", "tiny", "gpu", "all"], default="all",
                   help="which shape(s) to time: bench (hidden 256, 4 layers, 32 tokens), tiny (hidden 128, "
                   "2 layers, 4 tokens), all (bench and tiny), or gpu (hidden 512, 8 layers, P16xG8, 64 tokens: "
                   "for --device cuda)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="where both peers train (and the matmul probe runs); with cuda and --bf16 TRL is also "
                   "timed with bf16=True (autocast, as grpo_lab's bf16-mixed)")
    p.add_argument("--steps", type=int, default=5, help="timed training steps per peer and shape")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps before the timed ones")
    p.add_argument("--peers", default="grpo_lab,trl",
                   help="comma-separated peers to time: grpo_lab, trl")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                   help="also time grpo_lab with trainer precision bf16-mixed (CPU autocast; the loss stays "
                   "fp32) and compare it with TRL fp32")
    p.add_argument("--rss-fit", action=argparse.BooleanOptionalAction, default=True,
                   help="measure the peak RSS of `grpo-lab fit --config configs/tiny.yaml` for --rss-fit-steps steps")
    p.add_argument("--rss-fit-steps", type=int, default=100, help="trainer.max_steps of the --rss-fit run")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for the matmul probe and both peers (default: torch's own default in a "
                   "fresh process, which is what a fit uses)")
    p.add_argument("--matmul-size", type=int, default=1024, help="side of the square matrices of the matmul probe")
    p.add_argument("--matmul-seconds", type=float, default=3.0, help="seconds spent timing each matmul dtype")
    p.add_argument("--wait-quiet", type=float, default=120.0,
                   help="before the matmul probe and each peer run, wait up to this many seconds for other "
                   "processes to leave the CPU (0: never wait); the load during every timed step is recorded")
    p.add_argument("--quiet-threshold", type=float, default=0.25,
                   help="cores other processes may use for the machine to count as quiet")
    p.add_argument("--seed", type=int, default=0, help="seed of the policy weights, the data and the sampling")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results.json", help="where to write the results JSON")
    args = p.parse_args(argv)
    args.peers = [x.strip() for x in args.peers.split(",") if x.strip()]
    bad = [x for x in args.peers if x not in PEERS]
    if bad or not args.peers:
        p.error(f"--peers: unknown {bad}; choose from {', '.join(PEERS)}")
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    from rich.console import Console

    from grpo_lab.policy import PolicyConfig, build_policy, save_policy

    console = Console(width=None if sys.stdout.isatty() else 160)
    threads = args.threads or torch.get_num_threads()
    shapes = ["bench", "tiny"] if args.shape == "all" else [args.shape]
    busy = _busiest_others()
    if busy:
        console.print("[yellow]other processes are using the CPU; timings will be noisy:[/yellow]")
        for row in busy:
            console.print(f"  {row}")
    results: dict = {
        "schema": 1,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
        "machine": _machine(threads),
        "versions": _versions(),
        "settings": {
            "steps": args.steps,
            "warmup": args.warmup,
            "peers": args.peers,
            "bf16": args.bf16,
            "threads": threads,
            "seed": args.seed,
            "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        },
        "contention_at_start": busy,
        "device": args.device,
        "flop_formula": FLOP_FORMULA,
    }

    console.print(f"[bold]matmul probe[/bold] {args.matmul_size}^3, {threads} threads ...")
    results["matmul_quiet"] = wait_for_quiet(args.wait_quiet, args.quiet_threshold, console)
    mm = {"fp32": matmul_gflops("fp32", args.matmul_size, threads, args.matmul_seconds, args.device)}
    try:
        mm["bf16"] = matmul_gflops("bf16", args.matmul_size, threads, args.matmul_seconds, args.device)
        mm["bf16"]["faster_than_fp32"] = mm["bf16"]["peak_gflops"] > mm["fp32"]["peak_gflops"]
        mm["bf16"]["speedup_vs_fp32"] = mm["bf16"]["peak_gflops"] / mm["fp32"]["peak_gflops"]
    except Exception as err:  # noqa: BLE001  (bf16 matmul unsupported on this CPU/build)
        mm["bf16"] = {"supported": False, "error": repr(err)}
    results["matmul"] = mm
    peak = mm["fp32"]["peak_gflops"]
    console.print(f"  fp32 peak {peak:.1f} GFLOP/s (median {mm['fp32']['median_gflops']:.1f})"
                  + (f"; bf16 peak {mm['bf16']['peak_gflops']:.1f} GFLOP/s" if "peak_gflops" in mm["bf16"] else ""))

    results["shapes"] = {}
    failed = False
    with tempfile.TemporaryDirectory(prefix="grpo_bench_") as tmp:
        workdir = Path(tmp)
        for shape in shapes:
            spec = _shape_spec(shape)
            cfg = PolicyConfig(hidden_size=spec["hidden_size"], num_layers=spec["num_layers"],
                               num_heads=spec["num_heads"], intermediate_size=spec["intermediate_size"],
                               max_positions=spec["max_positions"])
            model, tok = build_policy(cfg, seed=args.seed)
            model_dir = workdir / f"policy_{shape}"
            save_policy(model, tok, model_dir)
            vocab = model.config.vocab_size
            del model
            base = {**spec, "model_dir": str(model_dir), "num_train": 4096, "seed": args.seed,
                    "warmup": args.warmup, "steps": args.steps, "threads": threads, "device": args.device}
            runs = [(p, False) for p in args.peers]
            if args.bf16 and "grpo_lab" in args.peers:
                runs.append(("grpo_lab", True))
            if args.bf16 and "trl" in args.peers and args.device == "cuda":
                runs.append(("trl", True))
            entry = {"work": {**spec, "batch_sequences": spec["prompts"] * spec["num_generations"],
                              "vocab_size": vocab}, "peers": {}}
            for peer, bf16 in runs:
                key = peer + ("_bf16" if bf16 else "")
                console.print(f"[bold]{shape}[/bold]: {key} ({args.warmup} warm-up + {args.steps} timed steps) ...")
                quiet = wait_for_quiet(args.wait_quiet, args.quiet_threshold, console)
                raw = _run_peer(peer, {**base, "bf16": bf16}, workdir)
                raw["quiet_before_start"] = quiet
                if raw.get("ok"):
                    pl = raw["prompt_padded_lengths"]
                    flops = estimate_flops(spec, statistics.mean(pl) if pl else 6, vocab)
                    summary = _summarize(raw, spec, args.warmup, flops, peak)
                    summary["flops_per_step"] = flops
                    s = summary["seconds_per_step"]
                    console.print(f"  median {s['median']:.3f} s/step (min {s['min']:.3f}, max {s['max']:.3f}), "
                                  f"peak RSS {summary['peak_rss_mb']:.0f} MB")
                else:
                    summary = raw
                    failed = failed or not bf16
                    console.print(f"  [red]failed[/red]: {raw['error']}\n    " + "\n    ".join(raw["log_tail"][-8:]))
                entry["peers"][key] = summary
            entry["ratios"] = _ratios(entry["peers"])
            results["shapes"][shape] = entry

    # A second probe (fp32, bf16) after the peers: contention only ever lowers a probe, so the peak is the best of both.
    wait_for_quiet(min(args.wait_quiet, 60.0), args.quiet_threshold, console)
    again = matmul_gflops("fp32", args.matmul_size, threads, args.matmul_seconds, args.device)
    mm["fp32_end_probe"] = again
    if "peak_gflops" in mm["bf16"]:
        again_bf16 = matmul_gflops("bf16", args.matmul_size, threads, args.matmul_seconds, args.device)
        mm["bf16_end_probe"] = again_bf16
        mm["bf16"]["peak_gflops"] = max(mm["bf16"]["peak_gflops"], again_bf16["peak_gflops"])
    if again["peak_gflops"] > peak:
        console.print(f"  second fp32 probe: {again['peak_gflops']:.1f} GFLOP/s (> first); FLOP-limit fractions use it")
        peak = again["peak_gflops"]
        for entry in results["shapes"].values():
            for p in entry["peers"].values():
                if p.get("ok") and "flops_per_step" in p:
                    limit = p["flops_per_step"]["total_flops"] / (peak * 1e9)
                    p["flop_limit_seconds"] = limit
                    p["fraction_of_flop_limit"] = limit / p["seconds_per_step"]["median"]
    mm["fp32_peak_gflops_used"] = peak
    bf16_peak = mm["bf16"].get("peak_gflops")
    for entry in results["shapes"].values():
        p = entry["peers"].get("grpo_lab_bf16")
        if bf16_peak and p and p.get("ok"):  # the same work against the bf16 matmul peak (a lower limit)
            limit = p["flops_per_step"]["total_flops"] / (bf16_peak * 1e9)
            p["bf16_flop_limit_seconds"] = limit
            p["fraction_of_bf16_flop_limit"] = limit / p["seconds_per_step"]["median"]
    if "peak_gflops" in mm["bf16"]:
        mm["bf16"]["faster_than_fp32"] = mm["bf16"]["peak_gflops"] > peak
        mm["bf16"]["speedup_vs_fp32"] = mm["bf16"]["peak_gflops"] / peak

    if args.rss_fit:
        console.print(f"[bold]tiny fit RSS[/bold]: grpo-lab fit --config configs/tiny.yaml, {args.rss_fit_steps} steps ...")
        rss = _rss_fit(args.rss_fit_steps)
        results["tiny_fit"] = rss
        results["tiny_fit_peak_rss_mb"] = rss.get("peak_rss_mb")
        if rss.get("ok"):
            console.print(f"  peak RSS {rss['peak_rss_mb']:.0f} MB ({rss['wall_seconds']:.0f} s)")
        else:
            console.print(f"  [red]failed[/red]: {rss['error']}")
    results["targets"] = _targets(results)
    results["parent_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0

    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_name(args.out.name + ".tmp")
    tmp_out.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp_out, args.out)
    print_table(results, console)
    console.print(f"wrote {args.out}")
    return 1 if failed else 0


def _ratios(peers: dict) -> dict:
    def med(key):
        p = peers.get(key)
        return p["seconds_per_step"]["median"] if p and p.get("ok") else None

    out = {}
    g, t, b, tb = med("grpo_lab"), med("trl"), med("grpo_lab_bf16"), med("trl_bf16")
    if g and t:
        out["grpo_lab_over_trl"] = g / t
    if b and tb:
        out["grpo_lab_bf16_over_trl_bf16"] = b / tb
    if b and t:
        out["grpo_lab_bf16_over_trl_fp32"] = b / t
    if b and g:
        out["grpo_lab_bf16_over_grpo_lab_fp32"] = b / g
    return out


def _targets(results: dict) -> list[dict]:
    shapes = results.get("shapes", {})
    values = {
        "bench_fp32_ratio": shapes.get("bench", {}).get("ratios", {}).get("grpo_lab_over_trl"),
        "bench_bf16_ratio": shapes.get("bench", {}).get("ratios", {}).get("grpo_lab_bf16_over_trl_fp32"),
        "tiny_fp32_ratio": shapes.get("tiny", {}).get("ratios", {}).get("grpo_lab_over_trl"),
        "tiny_fit_peak_rss_gib": (results.get("tiny_fit") or {}).get("peak_rss_gib"),
    }
    return [
        {"name": k, "what": TARGETS_DOC[k][0], "value": v, "limit": TARGETS_DOC[k][1],
         "met": None if v is None else v <= TARGETS_DOC[k][1]}
        for k, v in values.items()
    ]


def print_table(results: dict, console) -> None:
    from rich.table import Table

    mm = results["matmul"]
    title = (f"GRPO step, {results['machine']['cpu_model']}, {results['settings']['threads']} threads; "
             f"fp32 matmul peak {mm['fp32_peak_gflops_used']:.0f} GFLOP/s")
    if "peak_gflops" in mm.get("bf16", {}):
        title += f", bf16 {mm['bf16']['peak_gflops']:.0f} ({'faster' if mm['bf16']['faster_than_fp32'] else 'not faster'})"
    table = Table(title=title)
    for col, kw in [("shape", {}), ("peer", {}), ("s/step median", {"justify": "right"}),
                    ("min-max", {"justify": "right"}), ("IQR", {"justify": "right"}),
                    ("compl. tok/s", {"justify": "right"}), ("vs TRL", {"justify": "right"}),
                    ("frac of fp32 FLOP limit", {"justify": "right"}), ("peak RSS MB", {"justify": "right"}),
                    ("others' load max", {"justify": "right"}), ("len ok", {})]:
        table.add_column(col, **kw)
    for shape, entry in results.get("shapes", {}).items():
        trl = entry["peers"].get("trl")
        trl_med = trl["seconds_per_step"]["median"] if trl and trl.get("ok") else None
        for key, p in entry["peers"].items():
            if not p.get("ok"):
                table.add_row(shape, key, "[red]failed[/red]", p.get("error", ""), "", "", "", "", "", "", "")
                continue
            s = p["seconds_per_step"]
            table.add_row(
                shape, key, f"{s['median']:.3f}", f"{s['min']:.3f}-{s['max']:.3f}", f"{s['iqr']:.3f}",
                f"{p['completion_tokens_per_s']:,.0f}",
                f"{s['median'] / trl_med:.2f}" if trl_med else "-",
                (f"{p['fraction_of_flop_limit']:.0%}" if "fraction_of_flop_limit" in p else "-")
                + (f" (bf16: {p['fraction_of_bf16_flop_limit']:.0%})" if "fraction_of_bf16_flop_limit" in p else ""),
                f"{p['peak_rss_mb']:.0f}",
                f"{max(p['other_load_cores_timed']):.2f} cores" if p["other_load_cores_timed"] else "-",
                "yes" if p["completion_lengths_all_equal_T"] else "[red]NO[/red]",
            )
    console.print(table)
    tt = Table(title="targets")
    for col in ("target", "value", "limit", "met"):
        tt.add_column(col)
    for t in results["targets"]:
        met = "-" if t["met"] is None else ("[green]yes[/green]" if t["met"] else "[red]no[/red]")
        tt.add_row(t["what"], "-" if t["value"] is None else f"{t['value']:.3f}", f"<= {t['limit']}", met)
    console.print(tt)
    if results.get("tiny_fit_peak_rss_mb"):
        console.print(f"tiny fit peak RSS: {results['tiny_fit_peak_rss_mb']:.0f} MB")


if __name__ == "__main__":
    sys.exit(main())
