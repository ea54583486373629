import json
import math

import lightning as L
import pytest
import torch

from grpo_lab.advantages import compute_advantages
from grpo_lab.data import QueryDataModule
from grpo_lab.module import GRPOModule
from grpo_lab.policy import PolicyConfig
from grpo_lab.rollout import sequence_logprobs
from grpo_lab.tasks import load_queries
from grpo_lab.variance import (
    DEFAULT_ESTIMATORS,
    GradientVarianceProbe,
    _RunningMoments,
    estimator_gradients,
    gradient_statistics,
    main,
    probe,
)
from grpo_lab.warmstart import WarmStartConfig

SMALL = PolicyConfig(hidden_size=32, num_layers=1, num_heads=2)
G = 4


def length_reward(completions, **_):
    """Completion length: spread inside most groups, so every estimator has a non-zero gradient."""
    return [float(len(c)) for c in completions]


def constant_reward(completions, **_):
    return [1.0] * len(completions)


def _module(reward="length_reward", **kwargs):
    kwargs = {"num_generations": G, "max_new_tokens": 4, **kwargs}
    return GRPOModule(policy=SMALL, warm_start=WarmStartConfig(steps=0), rewards=[f"tests.test_variance:{reward}"], **kwargs)


def _queries(n=16):
    return load_queries("arithmetic", n, 0)


def _params(module):
    return [p.detach().clone() for p in module.model.parameters()]


def _recording_rollouts(module, monkeypatch):
    """Patch ``module.rollout`` to count its calls and keep the rollouts it returned."""
    seen = []
    original = module.rollout

    def rollout(batch, *args, **kwargs):
        seen.append(original(batch, *args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(module, "rollout", rollout)
    return seen


# ---- gradient_statistics ------------------------------------------------------------------------------
HAND = torch.tensor([[1.0, 2.0], [3.0, 2.0], [2.0, 5.0]])  # K = 3 estimates of a D = 2 gradient


def test_gradient_statistics_by_hand():
    s = gradient_statistics(HAND, reference=torch.tensor([0.0, 1.0]))
    # mean ḡ = ((1+3+2)/3, (2+2+5)/3) = (2, 3);  ‖ḡ‖² = 4 + 9 = 13
    # deviations (-1,-1), (1,-1), (0,2): squared norms 2 + 2 + 4 = 8  ->  V = 8 / (K-1) = 4
    # S = ‖ḡ‖² - V/K = 13 - 4/3 = 35/3;  SNR = S/V = 35/12
    # cosine with (0,1): ḡ·r / (‖ḡ‖‖r‖) = 3 / √13;  relative variance V/‖ḡ‖² = 4/13
    assert s["variance"] == pytest.approx(4.0)
    assert s["signal"] == pytest.approx(35 / 3)
    assert s["snr"] == pytest.approx(35 / 12)
    assert s["cosine"] == pytest.approx(3 / math.sqrt(13))
    assert s["mean_norm"] == pytest.approx(math.sqrt(13))
    assert s["relative_variance"] == pytest.approx(4 / 13)
    assert s["num_batches"] == 3
    assert gradient_statistics(HAND)["cosine"] is None
    assert gradient_statistics(HAND, torch.tensor([-4.0, -6.0]))["cosine"] == pytest.approx(-1.0)


def test_scale_changes_variance_but_not_snr_or_cosine():
    torch.manual_seed(1)
    grads, ref = torch.randn(5, 7) + 0.5, torch.randn(7)
    a, b = gradient_statistics(grads, ref), gradient_statistics(10 * grads, 10 * ref)
    assert b["variance"] == pytest.approx(100 * a["variance"])
    assert b["signal"] == pytest.approx(100 * a["signal"])
    for key in ("snr", "cosine", "relative_variance"):
        assert b[key] == pytest.approx(a[key])


def test_degenerate_inputs():
    with pytest.raises(ValueError, match="K >= 2"):
        gradient_statistics(torch.ones(1, 3))
    with pytest.raises(ValueError, match=r"\[K, D\]"):
        gradient_statistics(torch.ones(3))
    zero = gradient_statistics(torch.zeros(4, 3), torch.ones(3))  # e.g. every group had zero spread
    assert zero["snr"] == 0.0 and zero["cosine"] == 0.0 and zero["relative_variance"] == 0.0
    same = gradient_statistics(torch.ones(4, 3))  # no noise, non-zero signal
    assert same["snr"] == math.inf and same["variance"] == 0.0
    assert not any(isinstance(v, float) and math.isnan(v) for s in (zero, same) for v in s.values())


def test_running_moments_match_the_two_pass_statistics():
    torch.manual_seed(2)
    grads, ref = torch.randn(6, 9) * 3 + 1, torch.randn(9)
    acc = _RunningMoments()
    for g in grads:
        acc.update(g)
    running, exact = acc.statistics(ref), gradient_statistics(grads, ref)
    for key, value in exact.items():
        assert running[key] == pytest.approx(value, rel=1e-9)


# ---- estimator_gradients ------------------------------------------------------------------------------
def test_rloo_is_a_rescaled_mean_baseline_on_one_shared_rollout(monkeypatch):
    module = _module()
    calls = _recording_rollouts(module, monkeypatch)
    grads = estimator_gradients(module, _queries(4), list(DEFAULT_ESTIMATORS))
    assert len(calls) == 1  # all estimators share one rollout
    assert set(grads) == set(DEFAULT_ESTIMATORS)
    d = sum(p.numel() for p in module.model.parameters())
    assert all(g.shape == (d,) and g.dtype == torch.float32 and g.device.type == "cpu" for g in grads.values())
    # A_rloo = G/(G-1) (r - mean r) = G/(G-1) A_mean_baseline, and the gradient is linear in A.
    assert grads["mean_baseline"].norm() > 0
    torch.testing.assert_close(grads["rloo"], G / (G - 1) * grads["mean_baseline"], rtol=1e-5, atol=1e-7)


def test_default_aggregation_is_the_modules_own_loss(monkeypatch):
    module = _module(aggregation="sequence_mean")
    batch = _queries(3)
    calls = _recording_rollouts(module, monkeypatch)
    grads = estimator_gradients(module, batch, ["group_norm"])
    rollout = calls[0]
    adv = compute_advantages(module.reward(rollout, batch), "group_norm").flatten()
    loss, _ = module.loss(rollout, adv, old_logprobs=None)
    expected = torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(module.model.parameters()))])
    torch.testing.assert_close(grads["group_norm"], -expected)  # the ascent direction


def test_constant_aggregation_sign_and_normalizer(monkeypatch):
    """Reward 1 with 'reward' and 'constant': the ascent direction is +∇ Σ log π / (B·max_new_tokens)."""
    module = _module(reward="constant_reward", advantage="reward", num_generations=1, max_new_tokens=3)
    batch = _queries(3)
    calls = _recording_rollouts(module, monkeypatch)
    const = estimator_gradients(module, batch, ["reward"], aggregation="constant")["reward"]
    rollout = calls[0]
    logprobs, _ = sequence_logprobs(module.model, rollout, module.hparams.temperature)
    objective = (logprobs * rollout.completion_mask).sum() / (len(batch) * 3)
    expected = torch.cat([g.flatten() for g in torch.autograd.grad(objective, list(module.model.parameters()))])
    torch.testing.assert_close(const, expected)
    # Group estimators need G >= 2: compute_advantages says so.
    with pytest.raises(ValueError, match="num_generations >= 2"):
        estimator_gradients(module, batch, ["rloo"])


# ---- probe --------------------------------------------------------------------------------------------
def test_probe_leaves_parameters_and_rng_alone():
    module = _module()
    module.model.eval()
    before, rng = _params(module), torch.get_rng_state()
    kwargs = {"num_batches": 3, "reference_batches": 3, "prompts_per_batch": 2, "seed": 5}
    stats = probe(module, _queries(), **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(before, _params(module), strict=True))
    assert torch.equal(rng, torch.get_rng_state())
    assert not module.model.training  # mode restored
    assert list(stats) == list(DEFAULT_ESTIMATORS)
    for s in stats.values():
        assert math.isfinite(s["snr"]) and -1.0 <= s["cosine"] <= 1.0 and s["variance"] > 0
        assert math.isfinite(s["reference_snr"])
    assert probe(module, _queries(), **kwargs) == stats  # seeded: reproducible
    with pytest.raises(ValueError, match="num_batches must be >= 2"):
        probe(module, _queries(), num_batches=1)


# ---- the callback and the command line ----------------------------------------------------------------
def _fit(module, callbacks=(), steps=2):
    L.seed_everything(0)
    trainer = L.Trainer(
        max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, accelerator="cpu", callbacks=list(callbacks),
    )
    trainer.fit(module, QueryDataModule(prompts_per_step=4, num_train=32, num_val=8))
    return trainer


def test_callback_probes_at_start_middle_and_end_without_perturbing_training(in_tmp):
    cb = GradientVarianceProbe(num_batches=3, reference_batches=4, prompts_per_batch=2)
    probed = _module()
    _fit(probed, [cb])
    assert sorted({(r["fraction"], r["step"]) for r in cb.results}) == [(0.0, 0), (0.5, 1), (1.0, 2)]
    assert len(cb.results) == 3 * len(DEFAULT_ESTIMATORS)
    assert {r["estimator"] for r in cb.results} == set(DEFAULT_ESTIMATORS)
    saved = json.loads((in_tmp / "probe.json").read_text())
    assert len(saved["results"]) == len(cb.results)
    plain = _module()
    _fit(plain)  # the same fit without the probe ends at the same weights
    assert all(torch.equal(a, b) for a, b in zip(_params(plain), _params(probed), strict=True))


def test_command_line_on_a_checkpoint(in_tmp, capsys):
    module = _module()
    trainer = _fit(module, steps=1)
    trainer.save_checkpoint(in_tmp / "x.ckpt")
    out = in_tmp / "out.json"
    main(["--ckpt", str(in_tmp / "x.ckpt"), "--estimators", "reward", "rloo", "--num-batches", "2",
          "--reference-batches", "2", "--reference-estimator", "rloo", "--prompts-per-batch", "2", "--num-queries", "16", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert [r["estimator"] for r in saved["results"]] == ["reward", "rloo"]
    assert saved["config"]["reference"] == "rloo/constant"
    assert "rloo" in capsys.readouterr().out
