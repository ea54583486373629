"""grpo_lab.system.rng.seeded: seeds and restores exactly the generators it names (the CPU's, and one CUDA
device's).

The bug it fixes showed on a GPU only (torch.manual_seed inside fork_rng(devices=[]) re-seeded every CUDA
generator and left it so); on a CPU machine the tests check the mechanism: nothing seeds a CUDA generator
unless a CUDA device is named."""

from __future__ import annotations

import torch

from grpo_lab.model.policy import PolicyConfig, build_policy
from grpo_lab.system.rng import seeded


def test_seeded_draws_from_the_seed_and_restores_the_cpu_state():
    torch.manual_seed(123)
    expected_after = torch.rand(4)
    torch.manual_seed(123)
    with seeded(7):
        inside = torch.rand(3)
    assert torch.equal(inside, torch.rand(3, generator=torch.Generator().manual_seed(7)))
    assert torch.equal(torch.rand(4), expected_after)  # the global stream goes on as if nothing happened


def test_nothing_seeds_a_cuda_generator_on_the_cpu(monkeypatch):
    calls = []
    for name in ("manual_seed", "manual_seed_all"):
        monkeypatch.setattr(torch.cuda, name, lambda seed, _n=name: calls.append((_n, seed)))
    with seeded(3), seeded(4, "cpu"):
        torch.rand(1)
    build_policy(PolicyConfig(hidden_size=16, num_layers=1, num_heads=2), seed=5)  # a from-scratch init
    assert calls == []
    torch.manual_seed(0)  # the old way, for contrast: it does seed every CUDA generator
    assert ("manual_seed_all", 0) in calls


def test_the_same_seed_builds_the_same_weights_and_leaves_the_stream_alone():
    cfg = PolicyConfig(hidden_size=16, num_layers=1, num_heads=2)
    torch.manual_seed(0)
    a, _ = build_policy(cfg, seed=5)
    after_a = torch.rand(2)
    torch.manual_seed(0)
    b, _ = build_policy(cfg, seed=5)
    assert torch.equal(torch.rand(2), after_a)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
