"""The machine a benchmark runs on: its matmul peak, what it is, and how busy the other processes keep it.

The machine may be shared (2 cores here), so every measurement records the load of *other* processes: the
difference of two snapshots of (the machine's busy CPU-seconds, this process's CPU-seconds, the wall clock)
gives the cores they used in between. Only ``time``, ``os`` and ``subprocess`` are imported at the top:
torch and psutil are imported where they are needed.
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import subprocess
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def matmul_gflops(dtype_name: str, size: int, threads: int, seconds: float, device: str = "cpu") -> dict:
    """GFLOP/s of ``size``^3 matmuls on ``device``: best and median of ~10 timed windows after a warm-up."""
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


def versions() -> dict:
    """Python's version and those of the packages the benchmark compares."""
    out = {"python": platform.python_version()}
    for pkg in ("torch", "trl", "transformers", "lightning", "accelerate", "datasets", "grpo_lab"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def machine_info(threads: int) -> dict:
    """The CPU model and its vector flags, the logical CPUs, torch's CPU capability and any CUDA device."""
    info = {"cpu_model": None, "logical_cpus": os.cpu_count(), "torch_threads": threads, "flags": []}
    try:
        text = Path("/proc/cpuinfo").read_text()
        for line in text.splitlines():
            if line.startswith("model name") and info["cpu_model"] is None:
                info["cpu_model"] = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16")
                info["flags"] = sorted(f for f in wanted if f in flags)
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


def git_commit() -> str | None:
    """The repository's HEAD commit (None outside a git checkout)."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def cpu_snapshot() -> tuple[float, float, float]:
    """(busy CPU-seconds of the machine incl. hypervisor steal, CPU-seconds of this process, wall clock)."""
    import psutil

    t = psutil.cpu_times()
    busy = t.user + t.nice + t.system
    busy += getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0) + getattr(t, "steal", 0.0)
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return busy, ru.ru_utime + ru.ru_stime, time.perf_counter()


def other_load(a: tuple[float, float, float], b: tuple[float, float, float]) -> float:
    """Average cores used by other processes (and steal) between snapshots ``a`` and ``b``."""
    wall = max(b[2] - a[2], 1e-9)
    return max(0.0, ((b[0] - a[0]) - (b[1] - a[1])) / wall)


def others_load(window: float = 2.0) -> float:
    """Cores used by other processes over ``window`` seconds while this one sleeps."""
    a = cpu_snapshot()
    time.sleep(window)
    return other_load(a, cpu_snapshot())


def wait_for_quiet(max_wait: float, threshold: float, console) -> dict:
    """Wait up to ``max_wait`` s until other processes use under ``threshold`` cores; the record of it."""
    t0 = time.perf_counter()
    load = others_load()
    said = False
    while load >= threshold and time.perf_counter() - t0 < max_wait:
        if not said:
            console.print(f"  [yellow]other processes use {load:.2f} cores; waiting up to {max_wait:.0f} s "
                          f"for < {threshold} ...[/yellow]")
            said = True
        load = others_load()
    return {"others_load_cores": load, "waited_seconds": time.perf_counter() - t0, "quiet": load < threshold}


def busiest_others(limit: int = 3) -> list[str]:
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
