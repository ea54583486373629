"""The ``baseline_coef`` estimator: A_i = r_i − c·b̄₋ᵢ, selected by name with ``--model.baseline_coef c``."""

import torch

from grpo_lab.advantages import compute_advantages, get_estimator, resolve_estimator
from grpo_lab.cli import cli_main
from grpo_lab.config import RLConfig

R = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])  # a flat group last


def test_the_family_spans_reward_and_rloo_linearly():
    adv = {c: compute_advantages(R, resolve_estimator("baseline_coef", baseline_coef=c))
           for c in (0.0, 0.4, 1.0)}
    assert torch.equal(adv[0.0], R)  # c = 0: reward, flat groups included
    assert torch.allclose(adv[1.0], compute_advantages(R, "rloo"))  # c = 1: rloo (a flat group's 0 too)
    assert torch.allclose(adv[0.4], 0.6 * adv[0.0] + 0.4 * adv[1.0])  # linear in c
    assert torch.allclose(compute_advantages(R, "baseline_coef"), adv[1.0])  # the registered name: c = 1


def test_the_config_and_the_cli_carry_the_coefficient():
    est = RLConfig(advantage="baseline_coef", baseline_coef=0.25).estimator
    assert torch.allclose(compute_advantages(R, est), R - 0.25 * (R.sum(-1, keepdim=True) - R) / 3)
    assert RLConfig(advantage="rloo", baseline_coef=0.25).estimator is get_estimator("rloo")
    cli = cli_main(["--config", "configs/ablate_smoke.yaml", "--model.advantage", "baseline_coef",
                    "--model.baseline_coef", "0.5", "--model.warm_start.steps", "0"], run=False)
    assert cli.model.estimator.fn.__name__ == "baseline_coef_0.5"
