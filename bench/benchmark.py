"""``make bench`` (``python -m bench.benchmark``): grpo_lab's GRPO step against TRL's ``GRPOTrainer``, same
work.

One run:

1. measures the machine's matmul throughput (fp32 and bf16, square ``--matmul-size`` matrices, with the
   torch thread count the fits use): the fp32 peak is the FLOP limit results are expressed against;
2. for each shape (``configs/bench.yaml``, ``configs/bench_tiny.yaml``) builds one random policy
   (``grpo_lab.model.policy.build_policy(..., seed=0)``, saved as a local HF directory that both peers
   load) and
   times ``--warmup`` + ``--steps`` full training steps of each peer, each peer in its own process
   (``bench/peers.py``) so its peak RSS is its own; with ``--bf16`` also grpo_lab under
   ``precision=bf16-mixed``;
3. with ``--rss-fit`` measures the peak RSS of a ``configs/tiny.yaml`` fit (``/usr/bin/time -f %M``);
4. writes ``--out`` (default ``results/bench.json``) and prints a table with the project's targets.

Every number is measured; the machine has few cores and may be shared: the load of other processes
during each timed step is measured and reported next to the times (``other_load_cores``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.figures import flop_fraction, print_table, ratios, summarize, targets
from bench.machine import busiest_others, git_commit, machine_info, matmul_gflops, versions, wait_for_quiet
from bench.work import FLOP_FORMULA, ROOT, estimate_flops, save_policy_for, shape_spec
from grpo_lab.system.process_env import child_env, configure_process

PEERS = ("grpo_lab", "trl")


# ---- the peers and the RSS fit, each in its own process -------------------------------------------------
def run_peer(peer: str, spec: dict, workdir: Path) -> dict:
    """Run ``bench/peers.py`` for one peer and shape in a fresh process; its result, or an error."""
    tag = f"{peer}{'_bf16' if spec['bf16'] else ''}_{spec['shape']}"
    spec_path, out_path, log_path = (workdir / f"{tag}.{ext}" for ext in ("spec.json", "result.json", "log"))
    spec_path.write_text(json.dumps({**spec, "peer": peer}))
    cmd = [sys.executable, "-m", "bench.peers", str(spec_path), str(out_path)]
    t0 = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(PYTHONWARNINGS="ignore"), stdout=log,
                                stderr=subprocess.STDOUT)
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


def rss_fit(steps: int) -> dict:
    """Peak RSS of a configs/tiny.yaml fit, measured by /usr/bin/time -f %M (KiB) in its own process."""
    exe = Path(sys.executable).parent / "grpo-lab"
    save_dir = tempfile.mkdtemp(prefix="benchrss_")
    tfile = Path(save_dir) / "time.txt"
    args = [str(exe), "fit", "--config", "configs/tiny.yaml", "--trainer.max_steps", str(steps),
            "--trainer.logger.init_args.save_dir", save_dir]
    timer = shutil.which("time") if not Path("/usr/bin/time").is_file() else "/usr/bin/time"
    cmd = [timer, "-f", "%M", "-o", str(tfile), *args] if timer else args
    t0 = time.perf_counter()
    try:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
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


# ---- the command line ------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.benchmark",
        description="Time grpo_lab's full GRPO training step against TRL's GRPOTrainer on identical work "
        "(configs/bench.yaml, configs/bench_tiny.yaml), relative to this machine's matmul peak; write JSON.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--shape", choices=["bench", "tiny", "gpu", "all"], default="all",
                   help="which shape(s) to time: bench (hidden 256, 4 layers, 32 tokens), tiny (hidden 128, "
                   "2 layers, 4 tokens), all (bench and tiny), or gpu (hidden 512, 8 layers, P16xG8, 64 "
                   "tokens: for --device cuda)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="where both peers train (and the matmul probe runs); with cuda and --bf16 TRL is "
                   "also timed with bf16=True (autocast, as grpo_lab's bf16-mixed)")
    p.add_argument("--steps", type=int, default=5, help="timed training steps per peer and shape")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps before the timed ones")
    p.add_argument("--peers", default="grpo_lab,trl",
                   help="comma-separated peers to time: grpo_lab, trl")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                   help="also time grpo_lab with trainer precision bf16-mixed (CPU autocast; the loss stays "
                   "fp32) and compare it with TRL fp32")
    p.add_argument("--rss-fit", action=argparse.BooleanOptionalAction, default=True,
                   help="measure the peak RSS of `grpo-lab fit --config configs/tiny.yaml` for "
                   "--rss-fit-steps steps")
    p.add_argument("--rss-fit-steps", type=int, default=100, help="trainer.max_steps of the --rss-fit run")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for the matmul probe and both peers (default: torch's own default in "
                   "a fresh process, which is what a fit uses)")
    p.add_argument("--matmul-size", type=int, default=1024,
                   help="side of the square matrices of the matmul probe")
    p.add_argument("--matmul-seconds", type=float, default=3.0, help="seconds spent timing each matmul dtype")
    p.add_argument("--wait-quiet", type=float, default=120.0,
                   help="before the matmul probe and each peer run, wait up to this many seconds for other "
                   "processes to leave the CPU (0: never wait); the load during every timed step is recorded")
    p.add_argument("--quiet-threshold", type=float, default=0.25,
                   help="cores other processes may use for the machine to count as quiet")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the policy weights, the data and the sampling")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "bench.json",
                   help="where to write the results JSON")
    args = p.parse_args(argv)
    args.peers = [x.strip() for x in args.peers.split(",") if x.strip()]
    bad = [x for x in args.peers if x not in PEERS]
    if bad or not args.peers:
        p.error(f"--peers: unknown {bad}; choose from {', '.join(PEERS)}")
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    return args


# ---- the run, phase by phase -----------------------------------------------------------------------------
def header(args: argparse.Namespace, argv: list[str] | None, threads: int, busy: list[str]) -> dict:
    """What the results were measured on and with (date, commit, machine, versions, settings)."""
    return {
        "schema": 1,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "machine": machine_info(threads),
        "versions": versions(),
        "settings": {
            "steps": args.steps,
            "warmup": args.warmup,
            "peers": args.peers,
            "bf16": args.bf16,
            "threads": threads,
            "seed": args.seed,
            "command": " ".join(["python -m bench.benchmark", *(argv if argv is not None else sys.argv[1:])]),
        },
        "contention_at_start": busy,
        "device": args.device,
        "flop_formula": FLOP_FORMULA,
    }


def probe_matmul(args: argparse.Namespace, threads: int) -> dict:
    """fp32 and (where it runs) bf16 matmul throughput; bf16's speed-up over fp32."""
    mm = {"fp32": matmul_gflops("fp32", args.matmul_size, threads, args.matmul_seconds, args.device)}
    try:
        mm["bf16"] = matmul_gflops("bf16", args.matmul_size, threads, args.matmul_seconds, args.device)
        mm["bf16"]["faster_than_fp32"] = mm["bf16"]["peak_gflops"] > mm["fp32"]["peak_gflops"]
        mm["bf16"]["speedup_vs_fp32"] = mm["bf16"]["peak_gflops"] / mm["fp32"]["peak_gflops"]
    except Exception as err:  # noqa: BLE001  (bf16 matmul unsupported on this CPU/build)
        mm["bf16"] = {"supported": False, "error": repr(err)}
    return mm


def time_shape(shape: str, args: argparse.Namespace, threads: int, peak: float, workdir: Path,
               console) -> tuple[dict, bool]:
    """Every peer's timed steps on one shape: ``(entry, failed)``, failed when an fp32 peer failed."""
    spec = shape_spec(shape)
    model_dir = workdir / f"policy_{shape}"
    vocab = save_policy_for(spec, args.seed, model_dir)
    base = {**spec, "model_dir": str(model_dir), "num_train": 4096, "seed": args.seed,
            "warmup": args.warmup, "steps": args.steps, "threads": threads, "device": args.device}
    runs = [(p, False) for p in args.peers]
    if args.bf16 and "grpo_lab" in args.peers:
        runs.append(("grpo_lab", True))
    if args.bf16 and "trl" in args.peers and args.device == "cuda":
        runs.append(("trl", True))
    entry = {"work": {**spec, "batch_sequences": spec["prompts"] * spec["num_generations"],
                      "vocab_size": vocab},
             "peers": {}}
    failed = False
    for peer, bf16 in runs:
        key = peer + ("_bf16" if bf16 else "")
        console.print(f"[bold]{shape}[/bold]: {key} ({args.warmup} warm-up + {args.steps} timed steps) ...")
        quiet = wait_for_quiet(args.wait_quiet, args.quiet_threshold, console)
        raw = run_peer(peer, {**base, "bf16": bf16}, workdir)
        raw["quiet_before_start"] = quiet
        if raw.get("ok"):
            pl = raw["prompt_padded_lengths"]
            flops = estimate_flops(spec, statistics.mean(pl) if pl else 6, vocab)
            summary = summarize(raw, spec, args.warmup, flops, peak)
            s = summary["seconds_per_step"]
            console.print(f"  median {s['median']:.3f} s/step (min {s['min']:.3f}, max {s['max']:.3f}), "
                          f"peak RSS {summary['peak_rss_mb']:.0f} MB")
        else:
            summary = raw
            failed = failed or not bf16
            console.print(f"  [red]failed[/red]: {raw['error']}\n    " + "\n    ".join(raw["log_tail"][-8:]))
        entry["peers"][key] = summary
    entry["ratios"] = ratios(entry["peers"])
    return entry, failed


def probe_matmul_again(results: dict, args: argparse.Namespace, threads: int, console) -> None:
    """A second probe (fp32, bf16) after the peers: contention only ever lowers a probe, so each peak is the
    best of both; the FLOP-limit fractions are recomputed against the peaks used."""
    mm, peak = results["matmul"], results["matmul"]["fp32"]["peak_gflops"]
    wait_for_quiet(min(args.wait_quiet, 60.0), args.quiet_threshold, console)
    again = matmul_gflops("fp32", args.matmul_size, threads, args.matmul_seconds, args.device)
    mm["fp32_end_probe"] = again
    if "peak_gflops" in mm["bf16"]:
        again_bf16 = matmul_gflops("bf16", args.matmul_size, threads, args.matmul_seconds, args.device)
        mm["bf16_end_probe"] = again_bf16
        mm["bf16"]["peak_gflops"] = max(mm["bf16"]["peak_gflops"], again_bf16["peak_gflops"])
    peers = [p for entry in results["shapes"].values() for p in entry["peers"].values()]
    if again["peak_gflops"] > peak:
        console.print(f"  second fp32 probe: {again['peak_gflops']:.1f} GFLOP/s (> first); FLOP-limit "
                      "fractions use it")
        peak = again["peak_gflops"]
        for p in peers:
            if p.get("ok") and "flops_per_step" in p:
                flop_fraction(p, peak)
    mm["fp32_peak_gflops_used"] = peak
    bf16_peak = mm["bf16"].get("peak_gflops")
    for entry in results["shapes"].values():
        p = entry["peers"].get("grpo_lab_bf16")
        if bf16_peak and p and p.get("ok"):  # the same work against the bf16 matmul peak (a lower limit)
            flop_fraction(p, bf16_peak, prefix="bf16_")
    if "peak_gflops" in mm["bf16"]:
        mm["bf16"]["faster_than_fp32"] = mm["bf16"]["peak_gflops"] > peak
        mm["bf16"]["speedup_vs_fp32"] = mm["bf16"]["peak_gflops"] / peak


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_process()
    import torch
    from rich.console import Console

    console = Console(width=None if sys.stdout.isatty() else 160)
    threads = args.threads or torch.get_num_threads()
    busy = busiest_others()
    if busy:
        console.print("[yellow]other processes are using the CPU; timings will be noisy:[/yellow]")
        for row in busy:
            console.print(f"  {row}")
    results = header(args, argv, threads, busy)

    console.print(f"[bold]matmul probe[/bold] {args.matmul_size}^3, {threads} threads ...")
    results["matmul_quiet"] = wait_for_quiet(args.wait_quiet, args.quiet_threshold, console)
    mm = results["matmul"] = probe_matmul(args, threads)
    console.print(f"  fp32 peak {mm['fp32']['peak_gflops']:.1f} GFLOP/s (median "
                  f"{mm['fp32']['median_gflops']:.1f})"
                  + (f"; bf16 peak {mm['bf16']['peak_gflops']:.1f} GFLOP/s" if "peak_gflops" in mm["bf16"]
                     else ""))

    results["shapes"], failed = {}, False
    with tempfile.TemporaryDirectory(prefix="grpo_bench_") as tmp:
        for shape in ["bench", "tiny"] if args.shape == "all" else [args.shape]:
            entry, shape_failed = time_shape(shape, args, threads, mm["fp32"]["peak_gflops"], Path(tmp),
                                             console)
            results["shapes"][shape], failed = entry, failed or shape_failed
    probe_matmul_again(results, args, threads, console)

    if args.rss_fit:
        console.print("[bold]tiny fit RSS[/bold]: grpo-lab fit --config configs/tiny.yaml, "
                      f"{args.rss_fit_steps} steps ...")
        rss = results["tiny_fit"] = rss_fit(args.rss_fit_steps)
        results["tiny_fit_peak_rss_mb"] = rss.get("peak_rss_mb")
        if rss.get("ok"):
            console.print(f"  peak RSS {rss['peak_rss_mb']:.0f} MB ({rss['wall_seconds']:.0f} s)")
        else:
            console.print(f"  [red]failed[/red]: {rss['error']}")
    results["targets"] = targets(results)
    results["parent_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0

    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_name(args.out.name + ".tmp")
    tmp_out.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp_out, args.out)
    print_table(results, console)
    console.print(f"wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
