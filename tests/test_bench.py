"""bench/'s public helpers: a shape's work from its config, the FLOP count, step statistics, ratios,
targets."""

import pytest

from bench.figures import quantiles, ratios, summarize, targets
from bench.machine import other_load
from bench.work import SHAPES, estimate_flops, shape_spec


def test_every_shape_config_gives_fixed_length_work():
    for name in SHAPES:
        spec = shape_spec(name)
        assert spec["shape"] == name and spec["beta"] == 0.0 and spec["num_iterations"] == 1
        assert spec["completion_tokens"] >= 1 and spec["prompts"] * spec["num_generations"] >= 2


def test_flops_by_hand():
    spec = {"hidden_size": 2, "num_layers": 1, "intermediate_size": 4, "completion_tokens": 2, "prompts": 1,
            "num_generations": 2}
    f = estimate_flops(spec, prompt_len=1, vocab=3)
    # N = 1*(4*4 + 3*2*4) + 2*3 = 46; generation 2*46*2 + 4*2*(1 + 2) = 208;
    # training (S = 3) 6*46*3 + 12*2*9 = 1044
    assert f["n_matmul_params"] == 46
    assert (f["generation_flops"], f["training_flops"], f["total_flops"]) == (2 * 208, 2 * 1044, 2 * 1252)


def test_quantiles_and_a_peers_summary():
    assert quantiles([3.0, 1.0, 2.0, 4.0, 5.0]) == {"median": 3.0, "min": 1.0, "max": 5.0, "q1": 2.0,
                                                    "q3": 4.0,
                                                   "iqr": 2.0}
    assert quantiles([2.0])["iqr"] == 0.0
    spec = {"completion_tokens": 4, "prompts": 2, "num_generations": 2}
    raw = {"ok": True, "step_seconds": [9.0, 1.0, 2.0, 3.0], "other_load_cores": [0.0, 0.1, 0.9, 0.0],
           "completion_lengths": [[4, 4, 4, 4]] * 4, "precision": "32-true", "peak_rss_mb": 100.0,
           "threads": 2, "wall_seconds": 20.0, "n_params": 10, "model_dtype": "torch.float32",
           "attn_implementation": "eager"}
    s = summarize(raw, spec, warmup=1, flops={"total_flops": 4e9}, peak_fp32_gflops=2.0)
    assert s["timed_steps"] == [1.0, 2.0, 3.0] and s["warmup_steps"] == [9.0]
    assert s["seconds_per_step"]["median"] == 2.0 and s["completion_tokens_per_s"] == 16 / 2.0
    assert s["completion_lengths_all_equal_T"] and s["other_load_cores_max"] == 0.9
    assert s["seconds_per_step_quiet_steps"] is None  # only 2 of the 3 timed steps were quiet
    assert s["flop_limit_seconds"] == pytest.approx(2.0) and s["fraction_of_flop_limit"] == pytest.approx(1.0)
    assert summarize({"ok": False, "error": "x"}, spec, 1, None, None) == {"ok": False, "error": "x"}


def test_ratios_and_targets():
    def peer(median):
        return {"ok": True, "seconds_per_step": {"median": median}}

    r = ratios({"grpo_lab": peer(1.0), "trl": peer(4.0), "grpo_lab_bf16": peer(0.5),
                "trl_bf16": {"ok": False}})
    assert r == {"grpo_lab_over_trl": 0.25, "grpo_lab_bf16_over_trl_fp32": 0.125,
                 "grpo_lab_bf16_over_grpo_lab_fp32": 0.5}
    got = {t["name"]: t for t in targets({"shapes": {"tiny": {"ratios": {"grpo_lab_over_trl": 0.5}}},
                                          "tiny_fit": {"peak_rss_gib": 1.0}})}
    assert got["tiny_fp32_ratio"]["met"] is False and got["tiny_fit_peak_rss_gib"]["met"] is True
    assert got["bench_fp32_ratio"]["value"] is None and got["bench_fp32_ratio"]["met"] is None


def test_other_processes_load():
    # the machine was busy 3 CPU-seconds over 2 s of wall time, this process 1 of them: others used 1 core
    assert other_load((10.0, 5.0, 100.0), (13.0, 6.0, 102.0)) == 1.0
    assert other_load((10.0, 5.0, 100.0), (10.5, 6.0, 101.0)) == 0.0  # never negative
