"""NonFiniteGuard.before_optimizer_step: one fused gradient norm on the device, clipping that reuses it; the
logged norm and the clipped gradient are those of Lightning's grad_norm and torch's clip_grad_norm_."""

import types

import torch
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.utilities import grad_norm

from grpo_lab.train.callbacks import NonFiniteGuard


def stub_module(seed: int, scale: float = 1.0):
    """What the guard touches of a GRPOModule: ``model``, ``log``, ``trainer.precision_plugin``."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    (model(torch.randn(4, 7)).pow(2).sum() * scale).backward()
    logged = {}
    module = types.SimpleNamespace(model=model, trainer=types.SimpleNamespace(precision_plugin=Precision()),
                                   log=lambda name, value, **kw: logged.__setitem__(name, value))
    return module, logged


def test_norm_and_clipping_equal_lightnings_and_torchs():
    for seed, scale, max_norm in ((0, 1.0, 1.0), (1, 100.0, 1.0), (2, 0.01, 1.0), (3, 10.0, None)):
        module, logged = stub_module(seed, scale)
        ref_model = stub_module(seed, scale)[0].model
        expected = grad_norm(ref_model, 2)["grad_2.0_norm_total"]  # the former logged value
        if max_norm is not None:
            torch.nn.utils.clip_grad_norm_(ref_model.parameters(), max_norm)  # the former clipping
        optimizer = torch.optim.SGD(module.model.parameters(), lr=0.1)
        guard = NonFiniteGuard(max_bad_steps=3)
        guard.before_optimizer_step(module, optimizer, max_norm)
        total = logged["train/grad_norm"]
        assert isinstance(total, torch.Tensor) and total.dim() == 0  # on the device, not read back
        assert float(total) == float(expected)
        for p, q in zip(module.model.parameters(), ref_model.parameters(), strict=True):
            assert torch.equal(p.grad, q.grad)
        assert guard.skipped == 0


def test_a_non_finite_gradient_is_dropped_and_counted():
    module, logged = stub_module(0)
    next(module.model.parameters()).grad[0, 0] = float("nan")
    guard = NonFiniteGuard(max_bad_steps=3)
    guard.before_optimizer_step(module, torch.optim.SGD(module.model.parameters(), lr=0.1), 1.0)
    assert guard.skipped == 1 and all(p.grad is None for p in module.model.parameters())
    assert torch.isnan(logged["train/grad_norm"])
    guard.before_optimizer_step(module, None, 1.0)  # no gradient at all: nothing logged or counted
    assert guard.skipped == 1
