"""From a peer's raw step times to the benchmark's figures: statistics, FLOP fractions, ratios, targets."""

from __future__ import annotations

import statistics

TARGETS_DOC = {
    "bench_fp32_ratio": ("bench shape, fp32: grpo_lab s/step / TRL s/step", 0.6),
    "bench_bf16_ratio": ("bench shape: grpo_lab bf16-mixed s/step / TRL fp32 s/step", 0.35),
    "tiny_fp32_ratio": ("tiny shape, fp32: grpo_lab s/step / TRL s/step", 0.35),
    "tiny_fit_peak_rss_gib": ("peak RSS of `grpo-lab fit --config configs/tiny.yaml`, GiB", 1.5),
}
QUIET_CORES = 0.25  # a step counts as quiet when other processes used less than this


def quantiles(xs: list[float]) -> dict:
    """Median, min, max, quartiles and IQR of ``xs`` (inclusive quartiles; one value: all equal)."""
    xs = sorted(xs)
    q = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else [xs[0]] * 3
    return {"median": statistics.median(xs), "min": xs[0], "max": xs[-1], "q1": q[0], "q3": q[2],
            "iqr": q[2] - q[0]}


def flop_fraction(entry: dict, peak_gflops: float, prefix: str = "") -> None:
    """Set ``<prefix>flop_limit_seconds`` (the step's FLOPs at ``peak_gflops``) and
    ``fraction_of_<prefix>flop_limit`` (that over the measured median) on a summarized peer ``entry``."""
    limit = entry["flops_per_step"]["total_flops"] / (peak_gflops * 1e9)
    entry[f"{prefix}flop_limit_seconds"] = limit
    entry[f"fraction_of_{prefix}flop_limit"] = limit / entry["seconds_per_step"]["median"]


def summarize(raw: dict, spec: dict, warmup: int, flops: dict | None, peak_fp32_gflops: float | None) -> dict:
    """One peer's result (``bench/peers.py``) without its warm-up steps: step-time statistics (all timed
    steps, and the quiet ones when there are 3), throughput, the fixed-length check, memory and, given the
    step's FLOPs and the fp32 peak, the fraction of the FLOP limit reached. A failed run is returned as is."""
    if not raw.get("ok"):
        return raw
    times = raw["step_seconds"]
    loads = raw.get("other_load_cores", [0.0] * len(times))
    timed, timed_loads = times[warmup:], loads[warmup:]
    T = spec["completion_tokens"]
    B = spec["prompts"] * spec["num_generations"]
    lengths = [x for step in raw["completion_lengths"] for x in step]
    s = quantiles(timed)
    quiet = [t for t, x in zip(timed, timed_loads, strict=False) if x < QUIET_CORES]
    out = {
        "ok": True,
        "precision": raw["precision"],
        "seconds_per_step": s,
        "timed_steps": timed,
        "warmup_steps": times[:warmup],
        "cpu_seconds_per_step": quantiles(raw["cpu_seconds"][warmup:]) if raw.get("cpu_seconds") else None,
        "completion_tokens_per_step": B * T,
        "completion_tokens_per_s": B * T / s["median"],
        "completion_lengths_all_equal_T": bool(lengths) and all(x == T for x in lengths),
        "completion_length_min_max": [min(lengths), max(lengths)] if lengths else None,
        "rollouts_seen": len(raw["completion_lengths"]),
        "peak_rss_mb": raw["peak_rss_mb"],
        "other_load_cores_timed": timed_loads,
        "other_load_cores_max": max(timed_loads) if timed_loads else None,
        "seconds_per_step_quiet_steps": quantiles(quiet) if len(quiet) >= 3 else None,
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
    if flops is not None:
        out["flops_per_step"] = flops
    if flops is not None and peak_fp32_gflops:
        flop_fraction(out, peak_fp32_gflops)
        out["achieved_gflops"] = flops["total_flops"] / s["median"] / 1e9
    return out


def ratios(peers: dict) -> dict:
    """The medians' ratios between the peers that ran: grpo_lab/TRL in fp32, and the bf16 comparisons."""

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


def targets(results: dict) -> list[dict]:
    """Each of the project's targets (``TARGETS_DOC``) with its measured value and whether it is met."""
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
    """The peers' table and the targets' table on a Rich ``console``."""
    from rich.table import Table

    mm = results["matmul"]
    title = (f"GRPO step, {results['machine']['cpu_model']}, {results['settings']['threads']} threads; "
             f"fp32 matmul peak {mm['fp32_peak_gflops_used']:.0f} GFLOP/s")
    if "peak_gflops" in mm.get("bf16", {}):
        faster = "faster" if mm["bf16"]["faster_than_fp32"] else "not faster"
        title += f", bf16 {mm['bf16']['peak_gflops']:.0f} ({faster})"
    table = Table(title=title)
    right = {"justify": "right"}
    for col, kw in [("shape", {}), ("peer", {}), ("s/step median", right), ("min-max", right), ("IQR", right),
                    ("compl. tok/s", right), ("vs TRL", right), ("frac of fp32 FLOP limit", right),
                    ("peak RSS MB", right), ("others' load max", right), ("len ok", {})]:
        table.add_column(col, **kw)
    for shape, entry in results.get("shapes", {}).items():
        trl = entry["peers"].get("trl")
        trl_med = trl["seconds_per_step"]["median"] if trl and trl.get("ok") else None
        for key, p in entry["peers"].items():
            if not p.get("ok"):
                table.add_row(shape, key, "[red]failed[/red]", p.get("error", ""), "", "", "", "", "", "", "")
                continue
            s = p["seconds_per_step"]
            fraction = f"{p['fraction_of_flop_limit']:.0%}" if "fraction_of_flop_limit" in p else "-"
            if "fraction_of_bf16_flop_limit" in p:
                fraction += f" (bf16: {p['fraction_of_bf16_flop_limit']:.0%})"
            table.add_row(
                shape, key, f"{s['median']:.3f}", f"{s['min']:.3f}-{s['max']:.3f}", f"{s['iqr']:.3f}",
                f"{p['completion_tokens_per_s']:,.0f}", f"{s['median'] / trl_med:.2f}" if trl_med else "-",
                fraction, f"{p['peak_rss_mb']:.0f}",
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
