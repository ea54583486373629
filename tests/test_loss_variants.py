"""The loss variants of policy_loss against hand-computed values and gradients: GSPO, CISPO, dual clip, the
entropy bonus and the 80/20 token choice, and the sequence KL of kl_in="reward"."""

from __future__ import annotations

import math

import pytest
import torch

from grpo_lab.losses import LossSettings, policy_loss
from tests.test_losses import AGGS, F64, _gathered_logprobs, _single_token, example, scalar

# ------------------------------------------------------------- GSPO (importance_level="sequence")


def _gspo_example():
    # seq 0: log-ratios [.1, .3], A = +1 -> log s = .2, s = e^.2 = 1.2214 > 1.2: clipped, loss -1.2 per
    # token, grad 0
    # seq 1: log-ratios [-.2, 0, (.5 masked)], A = -2 -> log s = -.1, s = e^-.1 = .904837 in [.8, 1.2]:
    #        loss -(s * -2) = 1.809675 per token; the masked token's ratio must not enter s
    old = torch.tensor([[-1.0, -2.0, -0.5], [-0.7, -1.1, -0.9]], dtype=F64)
    logp = (old + torch.tensor([[0.1, 0.3, 0.0], [-0.2, 0.0, 0.5]], dtype=F64)).requires_grad_(True)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]], dtype=F64)
    return logp, old, torch.tensor([1.0, -2.0], dtype=F64), mask


def test_gspo_value_and_gradient_by_hand():
    logp, old, adv, mask = _gspo_example()
    s1 = math.exp(-0.1)
    loss, info = policy_loss(logp, old, adv, mask, LossSettings(importance_level="sequence"))
    # token_mean over 4 tokens: (2 * -1.2 + 2 * 2 s1) / 4
    assert scalar(loss) == pytest.approx((2 * -1.2 + 2 * 2 * s1) / 4, abs=1e-12)
    assert scalar(info["clip_fraction"]) == pytest.approx(0.5, abs=1e-12)  # seq 0's 2 tokens of 4
    assert scalar(info["ratio_mean"]) == pytest.approx((2 * math.exp(0.2) + 2 * s1) / 4, abs=1e-12)
    (g,) = torch.autograd.grad(loss, logp)
    # seq 1 unclipped: loss = 2 * (-A s1) / 4 (its two tokens), ds1/dlogp_t = s1 * mask_t / |o| = s1 / 2
    # -> d/dlogp_{1,t} = 2 * (-A) * (s1 / 2) / 4 = -A s1 / 4 = 2 s1 / 4; seq 0 clipped and masked tokens: 0
    want = torch.tensor([[0.0, 0.0, 0.0], [2 * s1 / 4, 2 * s1 / 4, 0.0]], dtype=F64)
    torch.testing.assert_close(g, want)


def _on_policy_grads(aggregation: str, *variants: dict) -> list[torch.Tensor]:
    """d loss / d logits at mu = 1 (old = logprobs.detach()) for each variant's keyword arguments."""
    gen = torch.Generator().manual_seed(2)
    theta = torch.randn(3, 4, 5, generator=gen, dtype=F64, requires_grad=True)
    ids = torch.randint(0, 5, (3, 4), generator=gen)
    adv = torch.tensor([1.5, -0.7, 0.3], dtype=F64)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=F64)
    grads = []
    for kwargs in variants:
        logprobs = _gathered_logprobs(theta, ids)
        settings = LossSettings(aggregation=aggregation, **kwargs)
        loss, _ = policy_loss(logprobs, logprobs.detach(), adv, mask, settings)
        grads.append(torch.autograd.grad(loss, theta)[0])
    return grads


@pytest.mark.parametrize("aggregation", AGGS)
def test_gspo_cispo_and_dual_clip_on_policy_have_the_reinforce_gradient(aggregation):
    # at mu = 1: s_i = 1 and grad s_i = mean_t grad log pi_t over |o_i| tokens (GSPO); w = 1 (CISPO);
    # ratio 1 < c
    plain, *variants = _on_policy_grads(aggregation, {}, {"importance_level": "sequence"},
                                        {"objective": "cispo"}, {"dual_clip": 1.5},
                                        {"importance_level": "sequence", "objective": "cispo"})
    assert plain.abs().sum() > 0
    for g in variants:
        torch.testing.assert_close(g, plain)


# ----------------------------------------------------------------------------- CISPO


# (ratio, A, loss, grad): loss = -w A log pi with w = clip(ratio, .8, 1.2) detached, log pi = -1 + log(ratio);
# the gradient -w A never vanishes, unlike the clipped objective's
CISPO = [
    (1.5, +1.0, -1.2 * (-1 + math.log(1.5)), -1.2),  # w clipped at 1.2 but still pushes (clip objective: 0)
    (0.5, -1.0, 0.8 * (-1 + math.log(0.5)), 0.8),  # w clipped at 0.8 (clip objective: 0)
    (1.1, -2.0, 2.2 * (-1 + math.log(1.1)), 2.2),  # inside: w = ratio
]


@pytest.mark.parametrize(("ratio", "adv", "loss", "grad"), CISPO)
def test_cispo_value_and_gradient_by_hand(ratio, adv, loss, grad):
    got_loss, got_grad, _ = _single_token(ratio, adv, objective="cispo")
    assert got_loss == pytest.approx(loss, abs=1e-12)
    assert got_grad == pytest.approx(grad, abs=1e-12)


# ----------------------------------------------------------------------------- dual clip


# (ratio, A, loss, grad, clipped) with clip .2 and dual_clip c = 3
DUAL = [
    (4.0, -1.0, 3.0, 0.0, 1.0),  # A < 0, ratio > c: max(4, 1.2) = 4 capped at c*|A| = 3, no gradient
    (2.0, -1.0, 2.0, 2.0, 0.0),  # A < 0, ratio < c: the clipped loss 2 (unclipped branch), grad -rA = 2
    (4.0, +1.0, -1.2, 0.0, 1.0),  # A > 0: dual clip does nothing (ordinary clip at 1.2)
    (0.5, -1.0, 0.8, 0.0, 1.0),  # A < 0, ratio low: ordinary clip, loss 0.8 < 3
]


@pytest.mark.parametrize(("ratio", "adv", "loss", "grad", "clipped"), DUAL)
def test_dual_clip_by_hand(ratio, adv, loss, grad, clipped):
    got_loss, got_grad, got_clip = _single_token(ratio, adv, dual_clip=3.0)
    assert got_loss == pytest.approx(loss, abs=1e-12)
    assert got_grad == pytest.approx(grad, abs=1e-12)
    assert got_clip == clipped
    if ratio > 3.0 and adv < 0:  # without dual clip the loss would be the unbounded ratio * |A|
        assert _single_token(ratio, adv)[0] == pytest.approx(ratio * -adv, abs=1e-12)


@pytest.mark.parametrize("kwargs", [{"dual_clip": 1.0}, {"dual_clip": 3.0, "objective": "cispo"},
                                    {"entropy_coef": -0.1}, {"top_entropy_quantile": 0.0},
                                    {"top_entropy_quantile": 1.5}])
def test_bad_variant_settings_rejected(kwargs):
    with pytest.raises(ValueError):
        LossSettings(**kwargs)


def test_unknown_objective_and_importance_level_list_names():
    logprobs, old, adv, mask = example()
    with pytest.raises(ValueError, match="unknown objective 'ppo'; known: cispo, clip"):
        policy_loss(logprobs, old, adv, mask, LossSettings(objective="ppo"))
    with pytest.raises(ValueError, match="unknown importance level 'tok'; known: sequence, token"):
        policy_loss(logprobs, old, adv, mask, LossSettings(importance_level="tok"))


# ----------------------------------------------------------------------------- entropy bonus and 80/20

ENTROPY = [[0.1, 0.5, 0.9], [0.3, 0.7, 9.0]]  # (1, 2) is masked: its 9.0 must not move the quantile


def test_entropy_bonus_value_and_gradient():
    logprobs, old, adv, mask = example()
    ent = torch.tensor(ENTROPY, dtype=F64, requires_grad=True)
    loss, _ = policy_loss(logprobs, old, adv, mask, LossSettings(entropy_coef=0.1), entropy=ent)
    # token_mean: 0.3 (the example) - 0.1 * (0.1 + 0.5 + 0.9 + 0.3 + 0.7) / 5 = 0.3 - 0.05
    assert scalar(loss) == pytest.approx(0.25, abs=1e-12)
    (g,) = torch.autograd.grad(loss, ent)
    torch.testing.assert_close(g, -0.1 * mask / 5)
    with pytest.raises(ValueError, match="needs the per-token entropy"):
        policy_loss(logprobs, old, adv, mask, LossSettings(entropy_coef=0.1))


def test_top_entropy_quantile_by_hand():
    from grpo_lab.losses import high_entropy_mask

    logprobs, old, adv, mask = example()
    logprobs = logprobs.clone().requires_grad_(True)
    ent = torch.tensor(ENTROPY, dtype=F64)
    # real entropies sorted [.1, .3, .5, .7, .9]; rho = .4 -> quantile(.6) at position 2.4: .5 + .4 * .2 = .58
    # -> tokens (0, 2) = .9 and (1, 1) = .7 are kept; per-token losses there: -1.0 and 1.6 (the example)
    kept = torch.tensor([[False, False, True], [False, True, False]])
    assert torch.equal(high_entropy_mask(ent, mask, 0.4), kept)
    loss, info = policy_loss(logprobs, old, adv, mask, LossSettings(top_entropy_quantile=0.4), entropy=ent)
    assert scalar(loss) == pytest.approx((-1.0 + 1.6) / 5, abs=1e-12)  # the normalizer still counts 5 tokens
    assert scalar(info["entropy_kept_fraction"]) == pytest.approx(0.4, abs=1e-12)
    (g,) = torch.autograd.grad(loss, logprobs)
    # (0, 2): unclipped, d(-ratio A)/dlogp = -1 * 1 / 5; (1, 1) is clipped (ratio .7, A < 0): 0;
    # the rest masked out
    torch.testing.assert_close(g, torch.tensor([[0.0, 0.0, -0.2], [0.0, 0.0, 0.0]], dtype=F64))
    # a given entropy_mask (chosen for a whole batch) wins over the entropies at hand
    other = torch.tensor([[True, False, False], [False, False, False]])
    loss2, _ = policy_loss(logprobs, old, adv, mask, LossSettings(top_entropy_quantile=0.4),
                           entropy_mask=other)
    assert scalar(loss2) == pytest.approx(-1.2 / 5, abs=1e-12)


def test_sequence_kl_by_hand():
    from grpo_lab.losses import sequence_kl

    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -0.5]], dtype=F64)
    ref = torch.tensor([[-1.5, -1.0, -9.0], [-0.5, -1.5, -0.5]], dtype=F64)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]], dtype=F64)
    # row 0: .5 + -1 (the masked -3 vs -9 is left out) = -.5; row 1: 0 + 1 + 0 = 1
    torch.testing.assert_close(sequence_kl(logp, ref, mask), torch.tensor([-0.5, 1.0], dtype=F64))
