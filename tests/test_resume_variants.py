"""Exact resume with the stateful variants on: dynamic sampling draws fresh queries from a seeded stream whose
position is in the checkpoint; KL in the reward, the 80/20 token choice and μ = 2 ride along. A run killed
(SIGKILL) after N optimizer steps and resumed logs what an uninterrupted run logs, and ends with its
weights."""

import signal

import pytest
import torch

from grpo_lab.train.tensorboard_scalars import read_scalars
from tests.test_resume import _overlay, _run

VARIANTS = ["--model.rewards", "[tests.test_resume_variants:half_flat]", "--model.dynamic_sampling", "true",
            "--model.max_resample_rounds", "2", "--model.beta", "0.05", "--model.kl_in", "reward",
            "--model.top_entropy_quantile", "0.5", "--model.num_iterations", "2", "--model.advantage",
            "james_stein"]


def half_flat(completions, answer, **_):
    """Flat for the sums below 12 (most easy queries: their groups are dropped and refilled every step), a
    value of the completion's text otherwise."""
    return [1.0 if int(a) < 12 else float(sum(map(ord, c)) % 5) for c,
            a in zip(completions, answer, strict=True)]


@pytest.mark.slow
def test_killed_and_resumed_run_with_variants_matches_an_uninterrupted_one(tmp_path):
    full = _run(tmp_path, "full", _overlay(tmp_path / "a.yaml", tmp_path / "ck_full", kill=False), *VARIANTS)
    assert full.returncode == 0, full.stderr[-3000:]
    killed = _run(tmp_path, "part", _overlay(tmp_path / "b.yaml", tmp_path / "ck_part", kill=True), *VARIANTS)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed = _run(tmp_path, "part", _overlay(tmp_path / "c.yaml", tmp_path / "ck_part", kill=False),
                   *VARIANTS, "--ckpt_path", str(tmp_path / "ck_part" / "last.ckpt"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    a, b = read_scalars(tmp_path / "runs" / "full"), read_scalars(tmp_path / "runs" / "part")
    # the stream is used before and after the kill, so its position must come back from the checkpoint
    rounds = dict(a["train/resample_rounds"])
    assert min(rounds.values()) > 0, rounds
    ckpt = torch.load(tmp_path / "ck_part" / "last.ckpt", weights_only=True)
    assert ckpt["grpo_lab"]["stream"]["drawn"] > 0
    for tag in ("train/reward", "train/loss", "train/grad_norm", "train/advantage_std",
                "train/resample_rounds", "train/dropped_groups", "train/kl_reward",
                "train/entropy_kept_fraction", "val/acc_sampled"):
        want = sorted(a[tag])
        got = sorted(dict(b[tag]).items())
        assert [s for s, _ in got] == [s for s, _ in want], tag
        for (s, x), (_, y) in zip(want, got, strict=True):
            assert abs(x - y) <= 1e-6, (tag, s, x, y)
    wa = torch.load(tmp_path / "ck_full" / "last.ckpt", weights_only=True)["state_dict"]
    wb = ckpt["state_dict"]
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
