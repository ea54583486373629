import json
import math
import threading
import time

import lightning as L
import pytest
import torch

from grpo_lab.advantages import compute_advantages
from grpo_lab.data.datamodule import QueryDataModule
from grpo_lab.data.tasks import load_queries
from grpo_lab.losses import LossSettings, policy_loss
from grpo_lab.model.policy import PolicyConfig
from grpo_lab.model.warmstart import WarmStartConfig
from grpo_lab.module import GRPOModule
from grpo_lab.probe.cache import cached
from grpo_lab.probe.gradients import _basis, batch_gradients
from grpo_lab.rollout import sequence_logprobs
from grpo_lab.system.errors import UserError
from grpo_lab.variance import (
    DEFAULT_ESTIMATORS,
    GradientVarianceProbe,
    estimator_gradients,
    main,
    probe,
)

SMALL = PolicyConfig(hidden_size=32, num_layers=1, num_heads=2)
G = 4


def length_reward(completions, **_):
    """Completion length: spread inside most groups, so every estimator has a non-zero gradient."""
    return [float(len(c)) for c in completions]


def constant_reward(completions, **_):
    return [1.0] * len(completions)


def _module(reward="length_reward", **kwargs):
    kwargs = {"num_generations": G, "max_new_tokens": 4, **kwargs}
    return GRPOModule(policy=SMALL, warm_start=WarmStartConfig(steps=0),
                      rewards=[f"tests.test_variance:{reward}"], **kwargs)


def _queries(n=16):
    return load_queries("arithmetic", n, 0)


def _params(module):
    return [p.detach().clone() for p in module.model.parameters()]


def _same(a: dict, b: dict) -> bool:
    """Equal as JSON (NaN equals NaN there)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _recording_rollouts(module, monkeypatch):
    """Patch ``module.rollout`` to count its calls and keep the rollouts it returned."""
    seen = []
    original = module.rollout

    def rollout(batch, *args, **kwargs):
        seen.append(original(batch, *args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(module, "rollout", rollout)
    return seen


# ---- estimator_gradients ------------------------------------------------------------------------------
def test_rloo_is_a_rescaled_mean_baseline_on_one_shared_rollout(monkeypatch):
    module = _module()
    calls = _recording_rollouts(module, monkeypatch)
    grads = estimator_gradients(module, _queries(4), list(DEFAULT_ESTIMATORS))
    assert len(calls) == 1  # all estimators share one rollout
    assert set(grads) == set(DEFAULT_ESTIMATORS)
    d = sum(p.numel() for p in module.model.parameters())
    assert all(g.shape == (d,) and g.dtype == torch.float32 and g.device.type == "cpu"
               for g in grads.values())
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
    surrogate = (logprobs * rollout.completion_mask).sum() / (len(batch) * 3)
    expected = torch.cat([g.flatten() for g in torch.autograd.grad(surrogate,
                                                                   list(module.model.parameters()))])
    torch.testing.assert_close(const, expected)
    # Group estimators need G >= 2: compute_advantages says so.
    with pytest.raises(ValueError, match="num_generations >= 2"):
        estimator_gradients(module, batch, ["rloo"])


def _ascent(module, rollout, advantages, aggregation, normalizer=None):
    """−∇ of the μ = 1 policy loss, written out directly (one backward pass per call)."""
    h = module.hparams
    logprobs, _ = sequence_logprobs(module.model, rollout, h.temperature)
    loss, _ = policy_loss(logprobs, logprobs.detach(), advantages, rollout.completion_mask,
                          LossSettings(aggregation=aggregation), normalizer=normalizer)
    return -torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(module.model.parameters()))])


def test_split_gradients_and_the_reference_match_the_direct_computation(monkeypatch):
    """Hard queries go first in the rollout and each part is forwarded alone; the hard part, the whole and
    the rloo/constant reference equal the gradients written out from the same rollout."""
    module = _module()
    batch = _queries(6)
    assert {q["difficulty"] for q in batch} == {"easy", "hard"}
    calls = _recording_rollouts(module, monkeypatch)
    out = batch_gradients(module, batch, ["reward", "group_norm", "rloo"], "rloo", ("difficulty", "hard"))
    (rollout,) = calls
    n_hard = sum(q["difficulty"] == "hard" for q in batch)
    ordered = sorted(batch, key=lambda q: q["difficulty"] != "hard")  # hard first, stable
    assert rollout.completions and len(rollout.completions) == len(batch) * G
    rewards = module.reward(rollout, ordered)
    hard = torch.arange(len(batch) * G) < n_hard * G
    for name in ("reward", "group_norm", "rloo"):
        adv = compute_advantages(rewards, name).flatten()
        torch.testing.assert_close(out.full[name], _ascent(module, rollout, adv, "token_mean"), rtol=1e-4,
                                   atol=1e-6)
        torch.testing.assert_close(out.hard[name], _ascent(module, rollout, adv * hard, "token_mean"),
                                   rtol=1e-4, atol=1e-6)
        assert out.hard[name].norm() > 0 and (out.full[name] - out.hard[name]).norm() > 0
    ref = _ascent(module, rollout, compute_advantages(rewards, "rloo").flatten(), "constant",
                  len(batch) * G * 4)
    torch.testing.assert_close(out.reference, ref, rtol=1e-4, atol=1e-6)
    easy_only = [q for q in _queries(16) if q["difficulty"] == "easy"][:3]
    none_hard = batch_gradients(module, easy_only, ["reward"], None, ("difficulty", "hard"))
    assert none_hard.hard["reward"].abs().max() == 0 and none_hard.full["reward"].norm() > 0


def test_basis_spans_the_cotangents_with_one_vector_per_direction():
    """rloo = G/(G-1) mean_baseline and the reference is a rescaled rloo: collinear cotangents cost no
    extra backward pass; a zero vector none at all; a small independent one is kept."""
    a, b = torch.tensor([1.0, 2.0, 0.0, -1.0]), torch.tensor([0.0, 1.0, 1.0, 0.0])
    rows = torch.stack([a, 4 / 3 * a, b, 0.25 * a, torch.zeros(4), 1e-3 * torch.tensor([1.0, 0.0, 0.0, 0.0])])
    basis, coefs = _basis(rows)
    assert basis.shape == (3, 4)
    torch.testing.assert_close(coefs @ basis, rows.double(), rtol=0, atol=1e-12)


# ---- probe --------------------------------------------------------------------------------------------
def test_probe_leaves_parameters_and_rng_alone():
    module = _module()
    module.model.eval()
    before, rng = _params(module), torch.get_rng_state()
    kwargs = {"num_batches": 6, "prompts_per_batch": 2, "seed": 5, "n_resamples": 200}
    stats = probe(module, _queries(), **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(before, _params(module), strict=True))
    assert torch.equal(rng, torch.get_rng_state())
    assert not module.model.training  # mode restored
    assert list(stats) == list(DEFAULT_ESTIMATORS)
    for s in stats.values():
        assert math.isfinite(s["snr"]) and s["variance"] > 0 and s["num_batches"] == 6
        assert s["cosine"] is None or -1.0 <= s["cosine"] <= 1.0
        assert s["hard_share"] is not None and s["ratio_to"] == "reward"
        if s["snr"] > 0 and stats["reward"]["snr"] > 0:
            assert s["snr_ratio"] == pytest.approx(s["snr"] / stats["reward"]["snr"])
        else:  # an SNR <= 0 is log SNR = -inf: the ratio is 0, inf, or (both <= 0) NaN
            assert not 0 < s.get("snr_ratio", math.nan) < math.inf
    # rloo = G/(G-1) mean_baseline on every batch: the same SNR, exactly a ratio of 1 between them
    assert stats["rloo"]["snr"] == pytest.approx(stats["mean_baseline"]["snr"], rel=1e-6)
    assert _same(probe(module, _queries(), **kwargs), stats)  # seeded: reproducible
    with pytest.raises(ValueError, match="num_batches must be >= 2"):
        probe(module, _queries(), num_batches=1)


def test_cached_computes_once_when_two_callers_race(tmp_path):
    calls = []

    def slow():
        calls.append(1)
        time.sleep(0.3)
        return {"x": 1.5}

    results = []
    threads = [threading.Thread(target=lambda: results.append(cached(tmp_path, "k", slow))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and sorted(hit for _, hit in results) == [False, True]
    assert all(value == {"x": 1.5} for value, _ in results)
    assert cached(None, "k", lambda: {"y": 2}) == ({"y": 2}, False)  # no cache dir: always computed


def test_second_trial_of_a_seed_reads_the_warm_start_probe_from_the_cache(tmp_path, monkeypatch):
    """Two trials of one seed start from the same weights: the second one's warm-start probe does no rollout.
    Other weights, another probe seed or other rollout settings are other entries."""
    kwargs = {"num_batches": 3, "prompts_per_batch": 2, "seed": 1, "n_resamples": 100,
              "cache_dir": str(tmp_path)}
    queries = _queries()
    first, second = _module(advantage="reward"), _module(advantage="rloo")  # same weights: seeded init
    calls = _recording_rollouts(second, monkeypatch)
    a, hit_a = GradientVarianceProbe(**kwargs).measure(first, queries)
    b, hit_b = GradientVarianceProbe(**kwargs).measure(second, queries)
    assert (hit_a, hit_b) == (False, True) and calls == [] and _same(a, b)
    _, hit = GradientVarianceProbe(**{**kwargs, "seed": 2}).measure(second, queries)
    assert not hit and len(calls) == 3
    with torch.no_grad():
        next(second.model.parameters()).add_(1e-3)
    _, hit = GradientVarianceProbe(**kwargs).measure(second, queries)
    assert not hit
    _, hit = GradientVarianceProbe(**kwargs).measure(_module(temperature=0.7), queries)
    assert not hit and len(list(tmp_path.glob("*.json"))) == 4


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
    cb = GradientVarianceProbe(num_batches=3, warm_start_batches=4, reference_batches=2, prompts_per_batch=2,
                               n_resamples=100)
    probed = _module()
    _fit(probed, [cb])
    assert sorted({(r["fraction"], r["step"]) for r in cb.results}) == [(0.0, 0), (0.5, 1), (1.0, 2)]
    assert len(cb.results) == 3 * len(DEFAULT_ESTIMATORS)
    assert {r["estimator"] for r in cb.results} == set(DEFAULT_ESTIMATORS)
    assert {r["fraction"]: r["num_batches"] for r in cb.results} == {0.0: 4, 0.5: 3, 1.0: 3}
    saved = json.loads((in_tmp / "probe.json").read_text())
    assert len(saved["results"]) == len(cb.results) and saved["config"]["warm_start_batches"] == 4
    with pytest.raises(UserError, match="warm_start_batches >= 2"):
        GradientVarianceProbe(warm_start_batches=1)
    plain = _module()
    _fit(plain)  # the same fit without the probe ends at the same weights
    assert all(torch.equal(a, b) for a, b in zip(_params(plain), _params(probed), strict=True))


def test_command_line_on_a_checkpoint(in_tmp, capsys):
    module = _module()
    trainer = _fit(module, steps=1)
    trainer.save_checkpoint(in_tmp / "x.ckpt")
    out = in_tmp / "out.json"
    main(["--ckpt", str(in_tmp / "x.ckpt"), "--estimators", "reward", "rloo", "--num-batches", "3",
          "--reference-batches", "2", "--reference-estimator", "rloo", "--prompts-per-batch", "2",
          "--num-queries", "16", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert [r["estimator"] for r in saved["results"]] == ["reward", "rloo"]
    assert saved["config"]["reference"] == "rloo/constant"
    assert "rloo" in capsys.readouterr().out
