"""Clipped policy-gradient loss: hand-computed values, KL estimators, aggregations, gradients, clipping."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from grpo_lab.losses import (
    AGGREGATIONS,
    KL_ESTIMATORS,
    LossSettings,
    aggregation_normalizer,
    kl_penalty,
    policy_loss,
)

F64 = torch.float64
AGGS = ["token_mean", "sequence_mean", "constant"]

# ---------------------------------------------------------------------------------------------
# The shared tiny [2, 3] example, clip 0.2 -> trust region [0.8, 1.2].
#   row 0, A = +1, ratios [1.5, 0.5, 1.0]
#     1.5: min(1.5*1, 1.2*1) = 1.2 -> loss -1.2   (clipped: ratio > 1.2 and A > 0)
#     0.5: min(0.5*1, 0.8*1) = 0.5 -> loss -0.5   (ratio < 0.8 but A > 0: unclipped term wins)
#     1.0: min(1.0, 1.0)     = 1.0 -> loss -1.0
#   row 1, A = -2, ratios [1.3, 0.7, 0.5], mask [1, 1, 0]
#     1.3: min(-2.6, 1.2*-2 = -2.4) = -2.6 -> loss 2.6  (ratio > 1.2 but A < 0: unclipped wins)
#     0.7: min(-1.4, 0.8*-2 = -1.6) = -1.6 -> loss 1.6  (clipped: ratio < 0.8 and A < 0)
#     0.5: min(-1.0, -1.6)          = -1.6 -> loss 1.6  (clipped, but MASKED OUT)
# ---------------------------------------------------------------------------------------------
RATIOS = [[1.5, 0.5, 1.0], [1.3, 0.7, 0.5]]
PER_TOKEN = [[-1.2, -0.5, -1.0], [2.6, 1.6, 1.6]]
OLD = [[-1.0, -0.5, -2.0], [-1.5, -0.3, -0.7]]
REF = [[-1.2, -0.4, -2.0], [-1.0, -0.9, -0.1]]
MASK = [[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]]
ADV = [1.0, -2.0]


def example():
    old = torch.tensor(OLD, dtype=F64)
    logprobs = old + torch.tensor(RATIOS, dtype=F64).log()
    return logprobs, old, torch.tensor(ADV, dtype=F64), torch.tensor(MASK, dtype=F64)


def scalar(x) -> float:
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)


# ----------------------------------------------------------------------------- per-token values


@pytest.mark.parametrize(("i", "j"), [(i, j) for i in range(2) for j in range(3)])
def test_per_token_loss_by_hand(i, j):
    # token_mean with a one-hot mask isolates the per-token loss of token (i, j)
    logprobs, old, adv, _ = example()
    onehot = torch.zeros(2, 3, dtype=F64)
    onehot[i, j] = 1.0
    loss, _ = policy_loss(logprobs, old, adv, onehot)
    assert scalar(loss) == pytest.approx(PER_TOKEN[i][j], abs=1e-12)


def test_aggregations_by_hand():
    logprobs, old, adv, mask = example()
    # masked per-token losses: row 0 [-1.2, -0.5, -1.0] (sum -2.7), row 1 [2.6, 1.6] (sum 4.2)
    # token_mean    = (-2.7 + 4.2) / 5      = 1.5 / 5 = 0.3
    # sequence_mean = (-2.7/3 + 4.2/2) / 2  = (-0.9 + 2.1) / 2 = 0.6
    # constant      = 1.5 / (B*T = 6)       = 0.25
    expected = {"token_mean": 0.3, "sequence_mean": 0.6, "constant": 0.25}
    for agg, value in expected.items():
        loss, _ = policy_loss(logprobs, old, adv, mask, LossSettings(aggregation=agg))
        assert loss.dim() == 0
        assert scalar(loss) == pytest.approx(value, abs=1e-12), agg


def test_default_aggregation_is_token_mean():
    logprobs, old, adv, mask = example()
    default, _ = policy_loss(logprobs, old, adv, mask)
    assert scalar(default) == pytest.approx(0.3, abs=1e-12)


def test_bool_mask_equals_float_mask():
    logprobs, old, adv, mask = example()
    for agg in AGGS:
        a, _ = policy_loss(logprobs, old, adv, mask, LossSettings(aggregation=agg))
        b, _ = policy_loss(logprobs, old, adv, mask.bool(), LossSettings(aggregation=agg))
        torch.testing.assert_close(a, b)


def test_aggregation_normalizer_by_hand_and_as_each_aggregations_default():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])  # B = 3 sequences, 4 real tokens, T = 4
    assert float(aggregation_normalizer("token_mean", mask)) == 4.0
    assert float(aggregation_normalizer("sequence_mean", mask)) == 3.0
    assert float(aggregation_normalizer("my_pkg.aggs:custom", mask)) == 3.0  # a custom one counts sequences
    assert float(aggregation_normalizer("constant", mask)) == 12.0  # B * padded width
    assert float(aggregation_normalizer("constant", mask, max_new_tokens=8)) == 24.0  # B * generation budget
    assert float(aggregation_normalizer("token_mean", torch.zeros(2, 3))) == 1.0  # never 0
    # DDP: two processes holding 4 and 6 tokens, gradients averaged over N = 2, so each divides by 10 / 2
    other = torch.tensor(6.0)
    got = aggregation_normalizer("token_mean", mask, total=lambda x: x + other, world=2)
    assert float(got) == 5.0
    got = aggregation_normalizer("constant", mask, 8, total=lambda x: x + 5.0, world=2)  # (3 + 5) / 2 * 8
    assert float(got) == 32.0
    logprobs, old, adv, m = example()
    for agg in AGGS:
        explicit, _ = policy_loss(logprobs, old, adv, m, LossSettings(aggregation=agg),
                                  normalizer=aggregation_normalizer(agg, m))
        default, _ = policy_loss(logprobs, old, adv, m, LossSettings(aggregation=agg))
        torch.testing.assert_close(explicit, default)


def test_normalizer_replaces_denominator():
    logprobs, old, adv, mask = example()
    n = float(mask.sum())  # 5
    default, _ = policy_loss(logprobs, old, adv, mask, LossSettings(aggregation="token_mean"))
    same, _ = policy_loss(logprobs, old, adv, mask, LossSettings(aggregation="token_mean"), normalizer=n)
    half, _ = policy_loss(logprobs, old, adv, mask, LossSettings(aggregation="token_mean"), normalizer=2 * n)
    torch.testing.assert_close(same, default)
    torch.testing.assert_close(half, default / 2)  # 1.5 / 10 = 0.15
    assert scalar(half) == pytest.approx(0.15, abs=1e-12)
    # constant: default denominator is B*T = 6; normalizer=6 is the same, normalizer=3 doubles it
    const, _ = policy_loss(logprobs, old, adv, mask, LossSettings(aggregation="constant"))
    const6, _ = policy_loss(logprobs, old, adv, mask, LossSettings(aggregation="constant"), normalizer=6.0)
    const3, _ = policy_loss(logprobs, old, adv, mask, LossSettings(aggregation="constant"), normalizer=3.0)
    torch.testing.assert_close(const6, const)
    assert scalar(const3) == pytest.approx(0.5, abs=1e-12)  # 1.5 / 3


def test_clip_fraction_by_hand():
    # clipping active on (0,0) [1.5, A>0] and (1,1) [0.7, A<0]; (1,2) is active but masked.
    # -> 2 of 5 real tokens = 0.4 (0.5 if the mask were ignored)
    logprobs, old, adv, mask = example()
    _, info = policy_loss(logprobs, old, adv, mask)
    assert scalar(info["clip_fraction"]) == pytest.approx(0.4, abs=1e-12)


def test_no_kl_entry_without_reference():
    logprobs, old, adv, mask = example()
    _, info = policy_loss(logprobs, old, adv, mask)
    assert "kl" not in info


# ----------------------------------------------------------------------------- KL estimators


def test_kl_estimators_by_hand():
    # d = ref - logp = [0, -1, +1]
    logp = torch.tensor([[0.0, -1.0, -2.0]], dtype=F64)
    ref = torch.tensor([[0.0, -2.0, -1.0]], dtype=F64)
    e = math.e
    expected = {
        "k1": [0.0, 1.0, -1.0],  # logp - ref = -d
        "k2": [0.0, 0.5, 0.5],  # d^2 / 2
        "k3": [0.0, 1 / e, e - 2],  # e^d - d - 1: [1-0-1, e^-1+1-1, e-1-1] = [0, 0.367879, 0.718282]
    }
    for name, values in expected.items():
        torch.testing.assert_close(kl_penalty(logp, ref, name), torch.tensor([values], dtype=F64))
    assert set(expected) <= set(KL_ESTIMATORS)


def test_k3_nonnegative_and_zero_when_equal():
    gen = torch.Generator().manual_seed(0)
    logp = torch.randn(8, 16, generator=gen, dtype=F64) * 3
    ref = torch.randn(8, 16, generator=gen, dtype=F64) * 3
    assert (kl_penalty(logp, ref, "k3") >= 0).all()
    # small differences too (where e^d - d - 1 ~ d^2/2 is tiny)
    small = logp + torch.linspace(-1e-3, 1e-3, 16, dtype=F64)
    assert (kl_penalty(logp, small, "k3") >= 0).all()
    # identical -> exactly 0 (exp(0) - 0 - 1)
    for dtype in (torch.float32, F64):
        x = logp.to(dtype)
        assert torch.equal(kl_penalty(x, x.clone(), "k3"), torch.zeros_like(x))


@pytest.mark.parametrize("kl_estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("aggregation", AGGS)
def test_beta_adds_beta_times_kl(kl_estimator, aggregation):
    logprobs, old, adv, mask = example()
    ref = torch.tensor(REF, dtype=F64)
    beta = 0.1
    loss, info = policy_loss(logprobs, old, adv, mask,
                             LossSettings(beta=beta, kl_estimator=kl_estimator, aggregation=aggregation),
                             ref_logprobs=ref)
    # manual per-token KL, independent of kl_penalty
    d = ref - logprobs
    kl = {"k1": -d, "k2": 0.5 * d**2, "k3": d.exp() - d - 1}[kl_estimator]
    per_token = torch.tensor(PER_TOKEN, dtype=F64) + beta * kl
    if aggregation == "token_mean":
        manual = (per_token * mask).sum() / mask.sum()
    elif aggregation == "sequence_mean":
        manual = ((per_token * mask).sum(1) / mask.sum(1)).mean()
    else:
        manual = (per_token * mask).sum() / mask.numel()
    torch.testing.assert_close(loss, manual)
    # info["kl"] is the masked token mean of the per-token KL
    assert scalar(info["kl"]) == pytest.approx(scalar((kl * mask).sum() / mask.sum()), abs=1e-12)


def test_kl_reported_even_with_zero_beta():
    logprobs, old, adv, mask = example()
    ref = torch.tensor(REF, dtype=F64)
    plain, _ = policy_loss(logprobs, old, adv, mask)
    loss, info = policy_loss(logprobs, old, adv, mask, LossSettings(beta=0.0), ref_logprobs=ref)
    torch.testing.assert_close(loss, plain)  # beta = 0: KL does not enter the loss
    d = ref - logprobs
    k3 = d.exp() - d - 1  # default estimator
    assert scalar(info["kl"]) == pytest.approx(scalar((k3 * mask).sum() / 5), abs=1e-12)


# ----------------------------------------------------------------------------- gradients


def _gathered_logprobs(theta, ids):
    return torch.log_softmax(theta, dim=-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("aggregation", AGGS)
def test_on_policy_gradient_equals_reinforce(aggregation):
    # With old = logprobs.detach(), ratio == 1 and d ratio / d logp == 1, so
    # grad of -min(ratio A, clip(ratio) A) == grad of -A logp, aggregated the same way.
    gen = torch.Generator().manual_seed(1)
    B, T, V = 3, 4, 5
    theta = torch.randn(B, T, V, generator=gen, dtype=F64, requires_grad=True)
    ids = torch.randint(0, V, (B, T), generator=gen)
    adv = torch.tensor([1.5, -0.7, 0.3], dtype=F64)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=F64)

    logprobs = _gathered_logprobs(theta, ids)
    loss, _ = policy_loss(logprobs, logprobs.detach(), adv, mask, LossSettings(aggregation=aggregation))
    (g_loss,) = torch.autograd.grad(loss, theta)

    logprobs = _gathered_logprobs(theta, ids)
    pg = -adv[:, None] * logprobs * mask
    if aggregation == "token_mean":
        reinforce = pg.sum() / mask.sum()
    elif aggregation == "sequence_mean":
        reinforce = (pg.sum(1) / mask.sum(1)).mean()
    else:
        reinforce = pg.sum() / (B * T)
    (g_ref,) = torch.autograd.grad(reinforce, theta)

    assert g_ref.abs().sum() > 0
    torch.testing.assert_close(g_loss, g_ref)


def _single_token(ratio, adv, **settings):
    """Loss and d loss / d logp for one token with the given ratio and advantage (and ``LossSettings``)."""
    old = torch.tensor([[-1.0]], dtype=F64)
    logp = (old + math.log(ratio)).clone().requires_grad_(True)
    loss, info = policy_loss(logp, old, torch.tensor([adv], dtype=F64), torch.ones(1, 1, dtype=F64),
                             LossSettings(**settings))
    (grad,) = torch.autograd.grad(loss, logp)
    return scalar(loss), scalar(grad), scalar(info["clip_fraction"])


# (ratio, A, expected loss, expected grad, clip active) with clip_low = clip_high = 0.2.
# Unclipped: loss = -ratio*A, d/dlogp = -ratio*A. Clipped: loss = -(1±0.2)*A, gradient exactly 0.
SYMMETRIC = [
    (1.5, +1.0, -1.2, 0.0, 1.0),  # ratio > 1.2, A > 0: clipped at 1.2, no gradient
    (1.5, -1.0, 1.5, 1.5, 0.0),  # ratio > 1.2, A < 0: min picks -1.5 (unclipped), grad = 1.5
    (0.5, -1.0, 0.8, 0.0, 1.0),  # ratio < 0.8, A < 0: clipped at 0.8, no gradient
    (0.5, +1.0, -0.5, -0.5, 0.0),  # ratio < 0.8, A > 0: min picks 0.5 (unclipped), grad = -0.5
    (1.1, +1.0, -1.1, -1.1, 0.0),  # inside the trust region
    (0.9, -2.0, 1.8, 1.8, 0.0),  # inside the trust region
]


@pytest.mark.parametrize(("ratio", "adv", "loss", "grad", "clipped"), SYMMETRIC)
def test_clipping_symmetric(ratio, adv, loss, grad, clipped):
    got_loss, got_grad, got_clip = _single_token(ratio, adv)
    assert got_loss == pytest.approx(loss, abs=1e-12)
    if grad == 0.0:
        assert got_grad == 0.0  # exactly zero, not just small
    else:
        assert got_grad == pytest.approx(grad, abs=1e-12)
    assert got_clip == clipped


# clip_low = 0.2, clip_high = 0.28 -> trust region [0.8, 1.28]
ASYMMETRIC = [
    (1.25, +1.0, -1.25, -1.25, 0.0),  # would be clipped at 1.2, but 1.25 < 1.28: still has gradient
    (1.30, +1.0, -1.28, 0.0, 1.0),  # 1.30 > 1.28: clipped at 1.28
    (1.30, -1.0, 1.30, 1.30, 0.0),  # A < 0: unclipped term wins
    (0.85, -1.0, 0.85, 0.85, 0.0),  # inside on the low side
    (0.75, -1.0, 0.80, 0.0, 1.0),  # 0.75 < 0.8 with A < 0: clipped at 0.8 (low side still 0.2)
    (0.75, +1.0, -0.75, -0.75, 0.0),  # A > 0: unclipped term wins
]


@pytest.mark.parametrize(("ratio", "adv", "loss", "grad", "clipped"), ASYMMETRIC)
def test_clipping_asymmetric(ratio, adv, loss, grad, clipped):
    got_loss, got_grad, got_clip = _single_token(ratio, adv, clip_low=0.2, clip_high=0.28)
    assert got_loss == pytest.approx(loss, abs=1e-12)
    if grad == 0.0:
        assert got_grad == 0.0
    else:
        assert got_grad == pytest.approx(grad, abs=1e-12)
    assert got_clip == clipped


def test_clip_gradient_zero_in_batch():
    # In the shared example the clipped tokens (0,0) and (1,1) get exactly zero gradient, the masked
    # token (1,2) gets zero gradient, the others don't.
    logprobs, old, adv, mask = example()
    logprobs = logprobs.clone().requires_grad_(True)
    loss, _ = policy_loss(logprobs, old, adv, mask)
    (g,) = torch.autograd.grad(loss, logprobs)
    zero = torch.tensor([[True, False, False], [False, True, True]])
    assert torch.equal(g[zero], torch.zeros(3, dtype=F64))
    # unclipped: d/dlogp of (-ratio*A)/5 = -ratio*A/5 -> (0,1): -0.5/5, (0,2): -1/5, (1,0): 2.6/5
    torch.testing.assert_close(g[~zero], torch.tensor([-0.1, -0.2, 0.52], dtype=F64))


# ----------------------------------------------------------------------------- validation


def test_registries_hold_builtins():
    assert {"k1", "k2", "k3"} <= set(KL_ESTIMATORS)
    assert set(AGGS) <= set(AGGREGATIONS)


def test_unknown_aggregation_lists_names():
    logprobs, old, adv, mask = example()
    with pytest.raises(ValueError) as err:
        policy_loss(logprobs, old, adv, mask, LossSettings(aggregation="nope"))
    for name in AGGREGATIONS:
        assert name in str(err.value)


def test_unknown_kl_estimator_lists_names():
    logprobs, old, adv, mask = example()
    ref = torch.tensor(REF, dtype=F64)
    with pytest.raises(ValueError) as err:
        policy_loss(logprobs, old, adv, mask, LossSettings(beta=0.1, kl_estimator="k9"), ref_logprobs=ref)
    for name in KL_ESTIMATORS:
        assert name in str(err.value)
    with pytest.raises(ValueError) as err:
        kl_penalty(logprobs, ref, "k9")
    for name in KL_ESTIMATORS:
        assert name in str(err.value)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"clip_low": 1.0},
        {"clip_low": 1.5},
        {"clip_low": -0.1},
        {"clip_high": -0.1},
        {"beta": -0.1},
    ],
)
def test_bad_hyperparameters_rejected(kwargs):
    """Checked once, where the settings are built, not at every call of the loss."""
    with pytest.raises(ValueError):
        LossSettings(**kwargs)


def test_shape_mismatch_rejected():
    logprobs, old, adv, mask = example()
    with pytest.raises(ValueError):
        policy_loss(logprobs, old[:, :2], adv, mask)
    with pytest.raises(ValueError):
        policy_loss(logprobs, old, adv, mask[:, :2])
    with pytest.raises(ValueError):
        policy_loss(logprobs, old, torch.ones(3, dtype=F64), mask)
    with pytest.raises(ValueError):
        policy_loss(logprobs, old, adv, mask, LossSettings(beta=0.1),
                    ref_logprobs=torch.zeros(2, 4, dtype=F64))


def test_kl_estimator_and_aggregation_by_import_path(tmp_path, monkeypatch):
    (tmp_path / "my_losses_xyz.py").write_text(
        "def sq(logprobs, ref_logprobs):\n    return (logprobs - ref_logprobs) ** 2\n"
        "def total(loss, mask, normalizer=None):\n    return (loss * mask).sum()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    logprobs, old, adv, mask = example()
    ref = torch.tensor(REF, dtype=F64)
    torch.testing.assert_close(kl_penalty(logprobs, ref, "my_losses_xyz:sq"),
                               2 * kl_penalty(logprobs, ref, "k2"))
    summed, _ = policy_loss(logprobs, old, adv, mask, LossSettings(aggregation="my_losses_xyz:total"))
    mean, _ = policy_loss(logprobs, old, adv, mask, LossSettings(aggregation="token_mean"))
    torch.testing.assert_close(summed, mean * mask.sum())
    with pytest.raises(ValueError, match="has no attribute 'nope'"):
        policy_loss(logprobs, old, adv, mask, LossSettings(aggregation="my_losses_xyz:nope"))


def test_loss_settings_are_the_configs_fields_with_its_defaults():
    """``RLConfig.loss_settings()`` reads the fields ``LossSettings`` declares: each is a config field with
    the same default, so ``policy_loss``'s default is what a default config trains with."""
    from grpo_lab.config import RLConfig

    assert RLConfig().loss_settings() == LossSettings()
    s = RLConfig(clip_high=0.28, objective="cispo", beta=0.1, aggregation="constant").loss_settings()
    assert (s.clip_high, s.objective, s.beta, s.aggregation) == (0.28, "cispo", 0.1, "constant")
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.beta = 0.0  # what was checked is what the loss reads
