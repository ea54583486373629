"""The variants keep the two equalities the module promises: micro-batches give the full batch's update (also
with dynamic sampling and the 80/20 token choice), and 2 DDP processes give the single-process gradient for
the per-token and per-sequence loss variants (GSPO, CISPO, dual clip, entropy bonus)."""

from __future__ import annotations

import os

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from grpo_lab.data.datamodule import QueryDataModule
from grpo_lab.model.policy import PolicyConfig
from grpo_lab.model.warmstart import WarmStartConfig
from grpo_lab.module import GRPOModule
from grpo_lab.rollout import sequence_logprobs
from tests.test_distributed import G, _batch

SMALL = PolicyConfig(hidden_size=32, num_layers=1, num_heads=2)

# Each set runs with micro_batches 1 and 2 from the same seed; the flat groups of
# tests.test_dynamic_sampling's reward (answers 0, 2, 4, 6) make dynamic sampling refill.
OPTION_SETS = {
    "gspo_mu2": {"importance_level": "sequence", "num_iterations": 2},
    "cispo_mu2": {"objective": "cispo", "num_iterations": 2},
    "dual_clip_mu2": {"dual_clip": 1.05, "clip_high": 0.01, "clip_low": 0.01, "num_iterations": 2},
    "entropy_80_20": {"entropy_coef": 0.05, "top_entropy_quantile": 0.3},
    "dynamic_sampling": {"dynamic_sampling": True, "max_resample_rounds": 3, "advantage": "james_stein"},
    "kl_reward_otb": {"kl_in": "reward", "beta": 0.2, "advantage": "gradient_weighted",
                      "advantage_scale": "group"},
}


def _one_step(options: dict, micro_batches: int) -> list[torch.Tensor]:
    L.seed_everything(0)
    module = GRPOModule(policy=SMALL, warm_start=WarmStartConfig(steps=0),
                        rewards=["tests.test_dynamic_sampling:prompt_reward"], num_generations=3,
                        max_new_tokens=4, temperature=1.5, micro_batches=micro_batches,
                        optimizer=lambda p: torch.optim.SGD(p, lr=0.5), **options)
    dm = QueryDataModule(dataset="arithmetic_easy", prompts_per_step=4, num_train=32, num_val=8)
    trainer = L.Trainer(max_steps=options.get("num_iterations", 1), logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        accelerator="cpu")
    trainer.fit(module, dm)
    if options.get("dynamic_sampling"):
        assert module.stream.drawn > 0  # the batch was refilled
    return [p.detach().clone() for p in module.model.parameters()]


@pytest.mark.parametrize("name", sorted(OPTION_SETS))
def test_micro_batches_give_the_full_batch_update(name, in_tmp):
    # same init seed as below
    start = [p.detach().clone() for p in GRPOModule(policy=SMALL).model.parameters()]
    whole, split = _one_step(OPTION_SETS[name], 1), _one_step(OPTION_SETS[name], 2)
    changed = any(not torch.allclose(a, b) for a, b in zip(whole, start, strict=True))
    assert changed, "the step changed nothing"
    for a, b in zip(whole, split, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


LOSS_SETS = {
    "gspo": {"importance_level": "sequence"},
    "cispo": {"objective": "cispo"},
    "dual_clip": {"dual_clip": 1.1, "clip_high": 0.05},
    "entropy_bonus": {"entropy_coef": 0.1},
}


def _module(options: dict) -> GRPOModule:
    torch.manual_seed(0)
    return GRPOModule(policy=SMALL, num_generations=G, max_new_tokens=6, temperature=1.5, **options)


def _off_policy(rollout) -> torch.Tensor:
    """π_old: the batch's log-probabilities moved by a fixed amount, so ratios differ from 1 and clip."""
    with torch.no_grad():
        lp, _ = sequence_logprobs(_module({}).model, rollout, 1.5)
    return lp + 0.3 * torch.randn(lp.shape, generator=torch.Generator().manual_seed(7))


def _grad(module, rollout, adv, old, rows=slice(None), normalizer=None):
    module.model.zero_grad()
    loss, _ = module.loss(rollout.select(rows), adv[rows], old[rows], normalizer)
    loss.backward()
    return loss.detach(), torch.cat([p.grad.flatten() for p in module.model.parameters()])


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        rollout, adv = _batch()
        old = _off_policy(rollout)
        half = rollout.completion_ids.shape[0] // world
        rows = slice(rank * half, (rank + 1) * half)
        for name, options in LOSS_SETS.items():
            loss, grad = _grad(_module(options), rollout, adv, old, rows)
            dist.all_reduce(grad)
            dist.all_reduce(loss)
            if rank == 0:
                torch.save({"loss": loss / world, "grad": grad / world}, os.path.join(out_dir, f"{name}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_give_the_single_process_gradient_for_loss_variants(tmp_path):
    rollout, adv = _batch()
    old = _off_policy(rollout)
    ref = {name: _grad(_module(o), rollout, adv, old) for name, o in LOSS_SETS.items()}
    clip = _module(LOSS_SETS["dual_clip"]).loss(rollout, adv, old)[1]["clip_fraction"]
    assert clip > 0  # the off-policy ratios do clip
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for name in LOSS_SETS:
        got = torch.load(tmp_path / f"{name}.pt")
        torch.testing.assert_close(got["loss"], ref[name][0], atol=1e-6, rtol=1e-5, msg=f"loss, {name}")
        torch.testing.assert_close(got["grad"], ref[name][1], atol=1e-6, rtol=1e-5, msg=f"grad, {name}")
