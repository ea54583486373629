"""The loss and gradient of one rollout batch are the same with 1 process, 2 DDP processes (gloo, CPU) and
micro-batches: the normalizers use global counts and a group's G completions stay on one rank."""

import dataclasses
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from grpo_lab.advantages import compute_advantages
from grpo_lab.model.policy import PolicyConfig
from grpo_lab.module import GRPOModule
from tests.conftest import CONFIGS, ROOT

AGGREGATIONS = ("token_mean", "sequence_mean", "constant")
P, G = 4, 4


def _module(aggregation: str) -> GRPOModule:
    torch.manual_seed(0)
    return GRPOModule(policy=PolicyConfig(hidden_size=32, num_layers=1, num_heads=2), num_generations=G,
                      max_new_tokens=6, aggregation=aggregation, temperature=1.5)


def _batch():
    """One fixed rollout batch (P queries x G completions) with completions of different lengths."""
    module = _module("token_mean")
    torch.manual_seed(3)
    batch = [{"prompt": p} for p in ("1+2=", "33+44=", "5+5=", "9+")]
    rollout = module.rollout(batch)
    # An untrained policy rarely says EOS: cut the completions to unequal lengths 1..6 by hand.
    t = rollout.completion_ids.shape[1]
    lengths = torch.arange(P * G) % t + 1
    mask = (torch.arange(t) < lengths[:, None]).long()
    rollout = dataclasses.replace(rollout, completion_mask=mask)
    rewards = lengths.float().view(P, G)  # length as reward: spread in every group
    return rollout, compute_advantages(rewards, "group_norm").flatten()


def _grads(module: GRPOModule, rollout, adv, rows=slice(None), normalizer=None):
    module.model.zero_grad()
    loss, _ = module.loss(rollout.select(rows), adv[rows], None, normalizer)
    loss.backward()
    return loss.detach(), torch.cat([p.grad.flatten() for p in module.model.parameters()])


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        rollout, adv = _batch()
        half = rollout.completion_ids.shape[0] // world  # whole groups per rank: P/world queries each
        rows = slice(rank * half, (rank + 1) * half)
        for agg in AGGREGATIONS:
            loss, grad = _grads(_module(agg), rollout, adv, rows)
            dist.all_reduce(grad)  # what DDP does: average the gradients of the ranks
            dist.all_reduce(loss)
            if rank == 0:
                torch.save({"loss": loss / world, "grad": grad / world}, os.path.join(out_dir, f"{agg}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def single():
    rollout, adv = _batch()
    lengths = rollout.completion_mask.sum(-1)
    assert lengths.unique().numel() > 1  # the test means something only with unequal lengths
    return rollout, adv, {agg: _grads(_module(agg), rollout, adv) for agg in AGGREGATIONS}


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_micro_batches_give_the_full_batch_gradient(single, aggregation):
    rollout, adv, ref = single
    module = _module(aggregation)
    norm = module.normalizer(rollout.completion_mask)
    total_loss, total_grad = 0.0, 0.0
    for rows in (slice(0, 5), slice(5, 16)):  # uneven chunks on purpose
        loss, grad = _grads(module, rollout, adv, rows, norm)
        total_loss, total_grad = total_loss + loss, total_grad + grad
    torch.testing.assert_close(total_loss, ref[aggregation][0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(total_grad, ref[aggregation][1], atol=1e-6, rtol=1e-5)


def test_ddp_two_processes_give_the_single_process_gradient(single, tmp_path):
    _, _, ref = single
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for agg in AGGREGATIONS:
        got = torch.load(tmp_path / f"{agg}.pt")
        torch.testing.assert_close(got["loss"], ref[agg][0], atol=1e-6, rtol=1e-5, msg=f"loss, {agg}")
        torch.testing.assert_close(got["grad"], ref[agg][1], atol=1e-6, rtol=1e-5, msg=f"grad, {agg}")


def test_naive_token_mean_would_differ(single):
    """Guard that the test above can fail: per-rank token means averaged != the global token mean."""
    rollout, adv, ref = single
    module = _module("token_mean")
    halves = [_grads(module, rollout, adv, rows, rollout.completion_mask[rows].sum())
              for rows in (slice(0, 8), slice(8, 16))]
    naive = (halves[0][1] + halves[1][1]) / 2
    assert not torch.allclose(naive, ref["token_mean"][1], atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_lightning_ddp_fit_on_cpu(tmp_path):
    """A real `grpo-lab fit` with strategy=ddp over 2 CPU processes (gloo) runs end to end."""
    cmd = [sys.executable, "-m", "grpo_lab.cli", "fit", "--config", str(CONFIGS / "smoke.yaml"),
           "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.enable_progress_bar", "false",
           "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), "--model.warm_start.cache_dir",
           str(tmp_path / "ws")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert any((tmp_path / "runs").rglob("events.out.tfevents.*"))
