import ast
import inspect
import textwrap

import lightning as L
import pytest
import torch

from grpo_lab.advantages import compute_advantages
from grpo_lab.data.datamodule import QueryDataModule
from grpo_lab.model.policy import PolicyConfig
from grpo_lab.model.warmstart import WarmStartConfig
from grpo_lab.module import GRPOModule
from grpo_lab.rollout import sequence_logprobs
from grpo_lab.system.errors import UserError
from grpo_lab.train.callbacks import GuardedModule, ResumableModule

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
    """With a constant reward every group has zero spread -> advantage 0 -> loss gradient 0 -> AdamW step is
    0."""
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
    assert GRPOModule(policy=SMALL, advantage="reward", num_generations=1).rl.num_generations == 1
    with pytest.raises(UserError, match="'rloo' needs num_generations >= 2"):  # a group baseline does not
        GRPOModule(policy=SMALL, advantage="rloo", num_generations=1)


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
        _fit(GRPOModule(policy=SMALL, rewards=["tests.test_module:nan_sometimes"], num_generations=4),
             steps=1)
    module = GRPOModule(policy=SMALL, rewards=["tests.test_module:nan_sometimes"], num_generations=4,
                        invalid_rewards="drop")
    _fit(module, steps=1)
    assert module._invalid_rewards == 6  # rows 0, 3, ..., 15 of 16 completions
    assert module.skipped_steps == 0 and all(torch.isfinite(p).all() for p in module.model.parameters())


def test_an_invalid_reward_leaves_the_loss_through_a_new_mask_not_an_edit_of_the_rollout():
    torch.manual_seed(0)
    module = GRPOModule(policy=SMALL, rewards=["tests.test_module:nan_sometimes"], num_generations=3,
                        invalid_rewards="drop", max_new_tokens=2, min_new_tokens=2)
    batch = [{"prompt": "1+2=", "answer": "3"}, {"prompt": "4+4=", "answer": "8"}]
    rollout = module.rollout(batch)
    before = rollout.completion_mask.clone()
    rewards, _, invalid = module.score(rollout, batch)
    assert invalid.flatten().tolist() == [True, False, False, True, False, False]  # completions 0 and 3
    assert torch.equal(rollout.completion_mask, before)  # scoring changes nothing in place
    kept = rollout.without(invalid.flatten())
    assert kept.completion_mask.sum(-1).tolist() == [0, 2, 2, 0, 2, 2]
    assert torch.equal(rollout.completion_mask, before)
    assert rewards[0, 0] == rewards[0, 1:].mean()  # the group's mean: advantage 0 for it
    sample = module.sample(batch)  # the step's rollout carries the new mask
    assert sample.rollout.completion_mask.sum(-1).tolist() == [0, 2, 2, 0, 2, 2]


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
    (in_tmp / "q.jsonl").write_text('{"prompt": "1+1=", "answer": "2"}\n' * 8 + '{"prompt": "2+2="}\n'
                                    + '{"prompt": "3+3=", "answer": "6"}\n' * 8)
    with pytest.raises(ValueError, match=r"needs the column 'answer', which .*q\.jsonl:9 lacks"):
        _fit(GRPOModule(policy=SMALL, num_generations=2), steps=1, dataset=str(in_tmp / "q.jsonl"))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"objective": "ppo"}, "unknown objective 'ppo'; known: cispo, clip"),
        ({"importance_level": "tok"}, "unknown importance level 'tok'"),
        ({"reward_aggregation": "max"},
         "unknown reward aggregation 'max'; known: normalize_then_sum, weighted_sum"),
        ({"advantage_center": "median"}, "unknown advantage center 'median'"),
        ({"advantage_scale": "mad"}, "unknown advantage scale 'mad'"),
        ({"advantage": "tests.test_module:length_reward", "advantage_scale": "group"},
         "not a center/scale preset"),
        ({"dual_clip": 0.5}, "dual_clip must be > 1"),
        ({"dual_clip": 3.0, "objective": "cispo"}, "needs objective='clip'"),
        ({"top_entropy_quantile": 0.0}, r"top_entropy_quantile must be in \(0, 1\]"),
        ({"entropy_coef": -1.0}, "entropy_coef must be >= 0"),
        ({"kl_in": "both"}, "kl_in must be 'loss' or 'reward'"),
        ({"kl_in": "reward"}, "kl_in='reward' needs beta > 0"),
        ({"reward_weights": [1.0, 2.0]}, "reward_weights has 2 weights for 1 rewards"),
        ({"overlong_buffer": 9, "max_new_tokens": 8}, "1 <= overlong_buffer <= max_new_tokens"),
        ({"advantage_scale": "group", "advantage": "reward", "num_generations": 1},
         "needs num_generations >= 2"),
    ],
)
def test_bad_variant_settings_are_rejected_up_front(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GRPOModule(policy=SMALL, **kwargs)


def test_settings_are_flat_hparams_and_rebuild_the_module():
    from dataclasses import fields

    from grpo_lab.config import RLConfig

    module = GRPOModule(policy=SMALL, advantage="rloo", advantage_scale="batch", clip_high=0.28,
                        dynamic_sampling=True)
    h = module.hparams
    assert (h.advantage, h.advantage_scale, h.clip_high, h.num_generations, h.kl_estimator) == ("rloo",
                                                                                                "batch", 0.28,
                                                                                                8, "k3")
    assert {f.name for f in fields(RLConfig)} <= set(h)
    again = GRPOModule(**dict(h))  # what load_from_checkpoint does
    assert again.rl == module.rl and (again.estimator.center, again.estimator.scale) == ("leave_one_out",
                                                                                         "batch")


def test_overlong_penalty_sees_the_rollout_lengths():
    """max_new_tokens 4 and EOS suppressed: every completion is truncated at 4 tokens -> penalty -1 (C =
    1)."""
    torch.manual_seed(0)
    module = GRPOModule(policy=SMALL, rewards=["exact_match", "overlong_penalty"], reward_weights=[1.0, 0.5],
                        max_new_tokens=4, min_new_tokens=4, num_generations=2)
    batch = [{"prompt": "1+1=", "answer": "2"}, {"prompt": "3+4=", "answer": "7"}]
    rollout = module.rollout(batch)
    assert rollout.truncated.all()
    torch.testing.assert_close(module.reward(rollout, batch), torch.full((2, 2), -0.5))  # 0 exact + 0.5 x -1


def test_gradient_weighted_advantages_use_the_rollouts_log_probabilities():
    from grpo_lab.advantages import logit_gradient_energy

    torch.manual_seed(0)
    module = GRPOModule(policy=SMALL, advantage="gradient_weighted", num_generations=3, temperature=1.5)
    rollout = module.rollout([{"prompt": "1+1="}, {"prompt": "2+5="}])
    r = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    w = logit_gradient_energy(rollout.logprobs, rollout.completion_mask).view(2, 3)
    want = torch.stack([r[p, i] - sum(w[p, j] * r[p, j] for j in range(3) if j != i)
                        / sum(w[p, j] for j in range(3) if j != i)
                        for p in range(2) for i in range(3)]).view(2, 3)
    torch.testing.assert_close(module.advantages(rollout, r).view(2, 3), want)
    assert not torch.allclose(want, compute_advantages(r, "rloo"))  # the weights matter


def test_kl_in_reward_shapes_the_reward_before_the_advantage_and_leaves_the_loss_alone(in_tmp):
    import copy

    torch.manual_seed(0)
    module = GRPOModule(policy=SMALL, rewards=["tests.test_module:length_reward"], num_generations=3,
                        beta=0.5, kl_in="reward", temperature=1.5)
    ref = copy.deepcopy(module.model).requires_grad_(False)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))  # a reference that differs from the policy
    module._ref.append(ref)
    batch = [{"prompt": "1+1="}, {"prompt": "2+5="}]
    seen = {}
    module._log_step = lambda sample, adv, loss, stats, secs: seen.update(adv=adv, stats=stats, loss=loss)
    torch.manual_seed(1)
    loss = module.training_step(batch, 0)
    torch.manual_seed(1)  # the same rollout again, by hand
    sample = module.sample(batch)
    with torch.no_grad():
        ref_lp, _ = sequence_logprobs(ref, sample.rollout, 1.5)
    # k1 per completion
    kl = ((sample.rollout.logprobs - ref_lp) * sample.rollout.completion_mask).sum(-1).view(2, 3)
    assert kl.abs().sum() > 0
    torch.testing.assert_close(seen["adv"],
                               compute_advantages(sample.rewards - 0.5 * kl, "group_norm").flatten())
    assert not torch.allclose(seen["adv"], compute_advantages(sample.rewards, "group_norm").flatten())
    torch.testing.assert_close(seen["stats"]["kl_reward"], kl.mean())
    assert "kl" not in seen["stats"]  # no KL term in the loss
    plain, _ = module.loss(sample.rollout, seen["adv"], None)  # the loss is the policy term alone
    torch.testing.assert_close(loss.detach(), plain.detach())


def test_normalize_then_sum_feeds_the_advantage_and_the_metrics_keep_the_weighted_sum():
    from grpo_lab.rewards.scoring import aggregate_rewards, exact_match

    torch.manual_seed(0)
    module = GRPOModule(policy=SMALL, rewards=["exact_match", "tests.test_module:length_reward"],
                        reward_weights=[1.0, 0.5], reward_aggregation="normalize_then_sum", num_generations=3,
                        temperature=1.5)
    batch = [{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+5=", "answer": "7"}]
    sample = module.sample(batch)
    texts, answers = sample.rollout.completions, [q["answer"] for q in batch for _ in range(3)]
    values = torch.tensor([exact_match(texts, answers), length_reward(texts)]).view(2, 2, 3)
    torch.testing.assert_close(sample.seen_rewards, values[0] + 0.5 * values[1])  # train/reward: J's estimate
    torch.testing.assert_close(sample.rewards, aggregate_rewards(values, [1.0, 0.5], "normalize_then_sum"))


def test_every_setting_is_a_flag_with_help_and_parses_from_the_command_line():
    import subprocess
    import sys
    from dataclasses import fields

    from grpo_lab.cli import cli_main
    from grpo_lab.config import RLConfig
    from tests.conftest import ROOT

    out = subprocess.run([sys.executable, "-m", "grpo_lab.cli", "fit", "--help"], capture_output=True,
                         text=True, cwd=ROOT, check=True).stdout
    for f in fields(RLConfig):
        assert f"--model.{f.name} " in out, f.name
    assert "GSPO" in out and "80/20" in out and "DAPO's dynamic sampling" in out
    cli = cli_main(["--model.importance_level", "sequence", "--model.objective", "cispo",
                    "--model.entropy_coef", "0.1", "--model.top_entropy_quantile", "0.2", "--model.advantage",
                    "rloo", "--model.advantage_scale", "batch", "--model.beta", "0.1", "--model.kl_in",
                    "reward", "--model.dynamic_sampling", "true", "--model.reward_aggregation",
                    "normalize_then_sum", "--model.rewards", "[exact_match, overlong_penalty]",
                    "--model.overlong_buffer", "2", "--model.policy.hidden_size", "32",
                    "--model.policy.num_heads", "2", "--trainer.logger", "false"], run=False)
    rl = cli.model.rl
    assert (rl.importance_level, rl.objective, rl.entropy_coef) == ("sequence", "cispo", 0.1)
    assert (rl.top_entropy_quantile, rl.kl_in) == (0.2, "reward")
    assert (cli.model.estimator.center, cli.model.estimator.scale) == ("leave_one_out", "batch")
    assert rl.dynamic_sampling and rl.rewards == ["exact_match", "overlong_penalty"]
    assert rl.overlong_tokens == 2


# ---- the contracts of what GRPOModule is built from -----------------------------------------------------
def _self_attributes(cls) -> set[str]:
    """Every ``self.<name>`` the class's own source reads or writes."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    return {n.attr for n in ast.walk(tree)
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "self"}


def _declared(cls) -> set[str]:
    """A mixin's or Protocol's declared members: its annotations and its own methods."""
    methods = {k for k, v in vars(cls).items() if callable(v) and not k.startswith("__")}
    return set(getattr(cls, "__annotations__", {})) | methods


MIXINS = [c for c in GRPOModule.__mro__ if c.__module__.startswith("grpo_lab.train.")]  # SampledAccuracy, ...


@pytest.mark.parametrize("mixin", MIXINS, ids=lambda c: c.__name__)
def test_each_mixin_declares_all_it_uses_of_its_host(mixin):
    """A mixin's annotations are its contract with the host: it uses nothing of ``self`` it does not declare
    or define."""
    undeclared = _self_attributes(mixin) - set(vars(mixin)) - set(mixin.__annotations__)
    assert not undeclared, f"{mixin.__name__} uses {sorted(undeclared)} of its host without declaring it"


@pytest.mark.parametrize("contract", [*MIXINS, GuardedModule, ResumableModule], ids=lambda c: c.__name__)
def test_grpo_module_provides_what_its_mixins_and_callbacks_declare(contract):
    module = GRPOModule(policy=SMALL, warm_start=WarmStartConfig(steps=0))
    missing = sorted(name for name in _declared(contract) if name not in dir(module))
    assert not missing, f"{contract.__name__} needs {missing} of GRPOModule"
