import lightning as L
import pytest
import torch

from grpo_lab.data import QueryDataModule
from grpo_lab.module import GRPOModule
from grpo_lab.policy import PolicyConfig
from grpo_lab.warmstart import WarmStartConfig

SMALL = PolicyConfig(hidden_size=32, num_layers=1, num_heads=2)


def _fit(module, steps=2, **dm):
    dm = QueryDataModule(prompts_per_step=4, num_train=32, num_val=8, **dm)
    trainer = L.Trainer(
        max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, accelerator="cpu",
    )
    trainer.fit(module, dm)
    return trainer


def _params(module):
    return [p.detach().clone() for p in module.model.parameters()]


@pytest.mark.parametrize("num_iterations", [1, 3])
def test_a_training_step_changes_the_parameters(in_tmp, num_iterations):
    L.seed_everything(0)
    # A reward that always has spread inside a group: completion length, so every advantage is non-zero.
    module = GRPOModule(
        policy=SMALL, warm_start=WarmStartConfig(steps=0), rewards=["tests.test_module:length_reward"],
        num_generations=4, max_new_tokens=4, num_iterations=num_iterations,
    )
    before = _params(module)
    _fit(module, steps=1)
    changed = [not torch.equal(a, b) for a, b in zip(before, _params(module), strict=True)]
    assert sum(changed) >= len(changed) - 1  # (a norm weight may be untouched by a tiny step)
    assert module.automatic_optimization == (num_iterations == 1)


def length_reward(completions, **_):
    return [float(len(c)) for c in completions]


def test_zero_advantage_batch_leaves_weights_unchanged(in_tmp):
    """With a constant reward every group has zero spread -> advantage 0 -> loss gradient 0 -> AdamW step is 0."""
    L.seed_everything(0)
    module = GRPOModule(
        policy=SMALL, warm_start=WarmStartConfig(steps=0), rewards=["tests.test_module:constant_reward"],
        num_generations=4, optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
    )
    before = _params(module)
    _fit(module, steps=1)
    assert all(torch.equal(a, b) for a, b in zip(before, _params(module), strict=True))


def constant_reward(completions, **_):
    return [1.0] * len(completions)


def test_reference_model_only_with_beta(in_tmp):
    m0 = GRPOModule(policy=SMALL, num_generations=2)
    _fit(m0, steps=1)
    assert m0._ref == []
    m1 = GRPOModule(policy=SMALL, num_generations=2, beta=0.1)
    _fit(m1, steps=1)
    assert len(m1._ref) == 1 and not any(p.requires_grad for p in m1._ref[0].parameters())
    assert not any(k.startswith("_ref") for k in m1.state_dict())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"advantage": "nope"}, "unknown advantage estimator 'nope'; known: .*group_norm"),
        ({"aggregation": "nope"}, "unknown aggregation 'nope'; known: constant, sequence_mean, token_mean"),
        ({"kl_estimator": "k9"}, "unknown KL estimator 'k9'; known: k1, k2, k3"),
        ({"num_generations": 1}, "needs num_generations >= 2"),
        ({"clip_low": 1.0}, "clip_low < 1"),
        ({"beta": -0.1}, "beta must be >= 0"),
        ({"rewards": ["nope"]}, "unknown reward 'nope'"),
    ],
)
def test_bad_config_is_rejected_up_front(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GRPOModule(policy=SMALL, **kwargs)


def test_reward_raw_estimator_allows_one_generation():
    GRPOModule(policy=SMALL, advantage="reward", num_generations=1)


def huge_reward(completions, **_):
    return [3e38 * (i % 2) for i in range(len(completions))]  # the loss sum overflows to inf


def nan_sometimes(completions, **_):
    return [float("nan") if i % 3 == 0 else float(len(c)) for i, c in enumerate(completions)]


def test_non_finite_loss_is_skipped_and_counted_then_stops(in_tmp):
    L.seed_everything(0)
    module = GRPOModule(policy=SMALL, rewards=["tests.test_module:huge_reward"], advantage="reward",
                        num_generations=2, max_bad_steps=3)
    before = _params(module)
    _fit(module, steps=2)
    assert module.skipped_steps == 2
    assert all(torch.equal(a, b) for a, b in zip(before, _params(module), strict=True))
    with pytest.raises(RuntimeError, match="3 steps in a row had a non-finite loss"):
        _fit(GRPOModule(policy=SMALL, rewards=["tests.test_module:huge_reward"], advantage="reward",
                        num_generations=2, max_bad_steps=3), steps=5)


@pytest.mark.parametrize("num_iterations", [1, 2])
def test_non_finite_gradient_step_is_skipped(in_tmp, num_iterations):
    L.seed_everything(0)
    module = GRPOModule(policy=SMALL, rewards=["tests.test_module:length_reward"], num_generations=4,
                        num_iterations=num_iterations)
    module.model.model.embed_tokens.weight.register_hook(lambda g: g * float("nan"))
    before = _params(module)
    _fit(module, steps=1)
    assert module.skipped_steps == num_iterations  # every update of the rollout batch was skipped
    after = _params(module)
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert all(torch.isfinite(p).all() for p in after)


def test_invalid_rewards_error_or_drop(in_tmp):
    with pytest.raises(ValueError, match="nan_sometimes' returned nan"):
        _fit(GRPOModule(policy=SMALL, rewards=["tests.test_module:nan_sometimes"], num_generations=4), steps=1)
    module = GRPOModule(policy=SMALL, rewards=["tests.test_module:nan_sometimes"], num_generations=4, invalid_rewards="drop")
    _fit(module, steps=1)
    assert module._invalid_rewards == 6  # rows 0, 3, ..., 15 of 16 completions
    assert module.skipped_steps == 0 and all(torch.isfinite(p).all() for p in module.model.parameters())


def test_mask_truncated_makes_an_all_padding_batch_harmless(in_tmp):
    """One new token and no EOS: every completion is truncated; masked out, the batch has no tokens."""
    L.seed_everything(0)
    module = GRPOModule(policy=SMALL, rewards=["tests.test_module:length_reward"], num_generations=4,
                        max_new_tokens=1, min_new_tokens=1, mask_truncated=True,
                        optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    before = _params(module)
    _fit(module, steps=1)
    assert module.skipped_steps == 0
    assert all(torch.equal(a, b) for a, b in zip(before, _params(module), strict=True))


def test_reward_columns_are_checked_before_training(in_tmp):
    (in_tmp / "q.jsonl").write_text('{"prompt": "1+1=", "answer": "2"}\n' * 8 + '{"prompt": "2+2="}\n' + '{"prompt": "3+3=", "answer": "6"}\n' * 8)
    with pytest.raises(ValueError, match=r"needs the column 'answer', which .*q\.jsonl:9 lacks"):
        _fit(GRPOModule(policy=SMALL, num_generations=2), steps=1, dataset=str(in_tmp / "q.jsonl"))
