"""bench/gpu_check.sh: its pieces, and its dry run (the same steps on CPU at tiny sizes)."""

import json
import os
import subprocess
import sys

import pytest

from bench import gpu_check
from tests.conftest import ROOT


def test_digit_fraction_and_step1_comparison():
    assert gpu_check.digit_fraction(["12ab", "", "x"]) == [0.5, 0.0, 0.0]
    a = {"loss": 0.1, "reward": 0.2, "grad_norm": 1.0}
    assert gpu_check.same_step1(a, dict(a)) is True
    assert gpu_check.same_step1(a, {**a, "grad_norm": 1.0 + 1e-6}) is True
    assert gpu_check.same_step1(a, {**a, "grad_norm": 1.02}) is False  # the DDP sampler bug gave 1.4%
    assert gpu_check.same_step1(a, {**a, "loss": None}) is None


def test_fit_overlay_names_the_plan():
    cfg = gpu_check.fit_config(gpu_check.REAL, ROOT / "w", "fsdp", "fsdp", 10, checkpoint=False)
    t, m = cfg["trainer"], cfg["model"]
    assert (t["accelerator"], t["precision"]) == ("gpu", "bf16-mixed")
    assert (t["strategy"], t["max_steps"]) == ("fsdp", 10)
    assert not t["enable_checkpointing"]
    assert [c["class_path"] for c in t["callbacks"]] == ["grpo_lab.train.stepstats.StepStats"]
    p = m["policy"]
    n = p["num_layers"] * (4 * p["hidden_size"] ** 2 + 3 * p["hidden_size"] * 4 * p["hidden_size"])
    assert 90e6 < n < 130e6  # ~100M matmul weights
    assert m["rewards"] == gpu_check.REWARDS and m["warm_start"]["steps"] == 0
    assert m["max_grad_norm"] is None  # Lightning's FSDP refuses norm clipping
    ddp = gpu_check.fit_config(gpu_check.REAL, ROOT, "ddp", "ddp", 10, False)
    assert ddp["model"]["max_grad_norm"] == 1.0


def test_the_plans_name_every_step_and_the_decode_paths_compared():
    for plan in (gpu_check.REAL, gpu_check.DRY):
        assert set(plan["limits"]) == {"wheels", "fit", "profile", "probe", "bench", "ablate", "ddp", "fsdp"}
        assert "--sketch-dim" in plan["sketch"] and "--num-batches" in plan["sketch"]
    assert gpu_check.REAL["sketch"][1] == "32"  # issue 21: K = 32 batches of the 113M model
    assert "--trials-per-device" in gpu_check.REAL["ablate"]
    from bench.gpu_profile import decode_paths

    paths = decode_paths("cuda")
    assert len(paths) == 5 and list(paths.values())[0].kv_cache == "dynamic"
    default = [s for name, s in paths.items() if name.startswith("device default (")][0]
    assert default.compile and default.kv_cache == "static" and not default.share_prompts


def test_has_flag_reads_a_modules_help():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    assert gpu_check.has_flag("bench.gpu_profile", "--repeats", env)
    assert not gpu_check.has_flag("bench.gpu_profile", "--no-such-flag", env)


@pytest.mark.slow
def test_dry_run_runs_every_step_on_cpu(tmp_path):
    results = ROOT / "results" / "gpu.json"
    before = results.stat().st_mtime_ns if results.exists() else None
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "r.json"
    res = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run", "--workdir",
                          str(tmp_path / "w"), "--out", str(out)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    r = json.loads(out.read_text())
    assert res.returncode == 0, json.dumps(r, indent=1)[-4000:]
    assert r["dry_run"] and r["all_ok"] and "wheels" not in r
    fit = r["fit"]
    assert fit["ok"] and fit["steps"] == 3 and fit["completion_tokens_per_s"] > 0
    assert fit["peak_memory_gib"] > 0
    assert fit["precision"] == "bf16-mixed" and fit["step1"]["grad_norm"] > 0
    ddp, fsdp = r["strategies"]["ddp"], r["strategies"]["fsdp"]
    assert ddp["ok"] and ddp["strategy"] == "DDPStrategy" and ddp["same_step1_as_fit"] is True
    assert fsdp["ok"] or "refuses accelerator=cpu" in fsdp["expected_on_cpu"]
    assert r["bench"]["ok"] and r["bench"]["shapes"]["tiny"]["peers"]["grpo_lab"]["ok"]
    probe = r["variance_probe"]
    assert probe["ok"] and {e["estimator"] for e in probe["results"]} >= {"reward", "group_norm"}
    assert probe["sketched"] and probe["cost"]["seconds"] > 0
    prof = r["profile"]
    assert prof["ok"] and all(p["same_tokens_as_first_path"] for p in prof["rollout"].values())
    for way in ("prompts_shared", "prompts_not_shared"):
        summary = prof["step"][way]["profile_of_last_step"]
        assert summary["top"] and summary["host_reads"] > 0
    ablate = r["ablate"]
    assert ablate["ok"] and not ablate["placed_on_gpu"] and len(ablate["trials"]) >= 4
    assert (results.stat().st_mtime_ns if results.exists() else None) == before  # a dry run never writes it
