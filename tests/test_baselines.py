"""The field's variance-motivated baselines (grpo_lab/baselines.py) and their presets: OPO, MaxRL and the
online variance-optimal coefficient, by hand; the probe passes them the rollout's own weights."""

import pytest
import torch

from ablations.spaces.space import ProbeSettings
from grpo_lab.advantages import completion_weights, compute_advantages, get_estimator, logit_gradient_energy
from grpo_lab.baselines import leave_one_out_mean, length_weighted_baseline, online_coefficient
from grpo_lab.system.errors import UserError


def test_maxrl_divides_by_the_group_mean_reward():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    a = compute_advantages(r, "maxrl", eps=0.0)
    # (r − p̂)/p̂: p̂ = 1/2 gives ±1; p̂ = 1/4 gives 3 and −1; all failures: 0, never NaN
    torch.testing.assert_close(a, torch.tensor([[1.0, -1.0, -1.0, 1.0], [0.0] * 4, [3.0, -1.0, -1.0, -1.0]]))
    with pytest.raises(UserError, match="num_generations >= 2"):
        compute_advantages(torch.ones(3, 1), "maxrl")


def test_opo_is_the_length_weighted_group_mean():
    r, lengths = torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[1.0, 2.0, 3.0]])
    torch.testing.assert_close(length_weighted_baseline(r, lengths), torch.tensor([[1 / 6]]))
    torch.testing.assert_close(compute_advantages(r, "opo", weights=lengths),
                               torch.tensor([[5 / 6, -1 / 6, -1 / 6]]))
    # equal lengths: exactly the group mean (Dr. GRPO's mean_baseline)
    r = torch.rand(5, 4).round()
    torch.testing.assert_close(compute_advantages(r, "opo", weights=torch.full_like(r, 7.0)),
                               compute_advantages(r, "mean_baseline"))
    with pytest.raises(ValueError, match="needs weights"):
        compute_advantages(r, "opo")


def test_online_coefficient_minimises_the_weighted_squares_and_goes_to_one_under_an_offset():
    gen = torch.Generator().manual_seed(0)
    r = (torch.rand(8, 6, generator=gen) < 0.4).float()
    w = torch.rand(8, 6, generator=gen) + 0.1
    c = online_coefficient(r, w)
    loo = leave_one_out_mean(r)
    grid = torch.linspace(-1, 2, 3001)
    cost = torch.stack([(w * (r - g * loo) ** 2).sum() for g in grid])
    assert float(c) == pytest.approx(float(grid[cost.argmin()]), abs=1e-3)
    # by hand: one group [1, 0], weights [1, 3]: loo = [0, 1]; ĉ = Σ w r loo / Σ w loo² = 0 / 3
    assert float(online_coefficient(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 3.0]]))) == 0.0
    # a large reward offset: b* → the offset, so ĉ → 1 (the baseline map's c* does the same)
    assert float(online_coefficient(r + 100.0, w)) == pytest.approx(1.0, abs=0.01)
    assert float(online_coefficient(torch.zeros(2, 3), torch.ones(2, 3))) == 0.0  # nothing to weigh: reward
    a = compute_advantages(r, "online_coef", weights=w)
    torch.testing.assert_close(a, r - c * loo)


def test_completion_weights_by_kind():
    logp = torch.log(torch.tensor([[0.5, 0.9, 1.0], [0.2, 1.0, 1.0]]))
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    torch.testing.assert_close(completion_weights(get_estimator("opo"), logp, mask), torch.tensor([2.0, 1.0]))
    torch.testing.assert_close(completion_weights(get_estimator("online_coef"), logp, mask),
                               logit_gradient_energy(logp, mask))
    assert completion_weights(get_estimator("rloo"), logp, mask) is None


def test_the_probe_measures_the_weighted_baselines_as_training_computes_them(monkeypatch):
    from grpo_lab.probe.gradients import batch_gradients
    from tests.test_variance import _module, _queries, _recording_rollouts

    module = _module(advantage="opo")
    batch = _queries(3)
    calls = _recording_rollouts(module, monkeypatch)
    grads = batch_gradients(module, batch, ["reward", "opo", "online_coef", "gradient_weighted"]).full
    rollout = calls[0]
    adv = module.advantages(rollout, module.reward(rollout, batch))  # the module's own weights (lengths)
    loss, _ = module.loss(rollout, adv, old_logprobs=None)
    expected = torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(module.model.parameters()))])
    torch.testing.assert_close(grads["opo"], -expected, rtol=1e-4, atol=1e-6)
    assert all(g.norm() > 0 for g in grads.values())


def test_every_arms_own_estimator_is_probed_by_default():
    est = ProbeSettings().callback("my_pkg.mod:my_estimator", 0)["init_args"]["estimators"]
    assert est == ["reward", "mean_baseline", "group_norm", "rloo", "my_pkg.mod:my_estimator"]
    assert ProbeSettings().callback("rloo", 0)["init_args"]["estimators"].count("rloo") == 1
    # baseline_coef's registry name is c = 1; the arm's c lives in model.baseline_coef: not auto-probed
    assert "baseline_coef" not in ProbeSettings().callback("baseline_coef", 0)["init_args"]["estimators"]
    assert ProbeSettings(estimators="own").callback("opo", 0)["init_args"]["estimators"] == ["opo"]


def test_the_oracle_baseline_subtracts_each_querys_success_rate_from_extra_samples(monkeypatch):
    from grpo_lab.probe.gradients import ORACLE_DRAWS, batch_gradients
    from tests.test_variance import _module, _queries, _recording_rollouts

    r, p = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]]), torch.tensor([[0.25], [0.9]])
    # no flat-group rule: a flat group keeps r − p̂
    torch.testing.assert_close(compute_advantages(r, "oracle_p", weights=p.expand_as(r)), r - p)
    # a reward that depends on the query only: p̂_q is that reward exactly, so r − p̂ = 0 and so is the gradient
    module = _module(reward="constant_reward")
    calls = _recording_rollouts(module, monkeypatch)
    grads = batch_gradients(module, _queries(3), ["reward", "oracle_p"]).full
    assert len(calls) == 1 + ORACLE_DRAWS  # the group's rollout, then the draws for p̂
    assert grads["reward"].norm() > 0 and grads["oracle_p"].abs().max() == 0
    with pytest.raises(UserError, match="reference arm of the gradient probe"):
        completion_weights(get_estimator("oracle_p"), torch.zeros(2, 3), torch.ones(2, 3))
