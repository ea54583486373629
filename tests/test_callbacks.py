"""callbacks.py: the non-finite guard's counters and stop, the clipping by hand, and ExactResume's checkpoint
entry. (The fused gradient norm against Lightning's and torch's, and a non-finite gradient dropped, are in
tests/test_grad_norm.py.)"""

from __future__ import annotations

import random
import types

import numpy as np
import pytest
import torch
from lightning.pytorch.plugins.precision import Precision

from grpo_lab.train.callbacks import ExactResume, NonFiniteGuard


def one_parameter(grad: list[float], precision: Precision | None = None):
    """A module whose model has one parameter with gradient ``grad``; records logs and Lightning clipping."""
    weight = torch.nn.Parameter(torch.zeros(len(grad)))
    weight.grad = torch.tensor(grad)
    model = torch.nn.Module()
    model.weight = weight
    logged, clipped = {}, []
    module = types.SimpleNamespace(
        model=model, trainer=types.SimpleNamespace(precision_plugin=precision or Precision()),
        log=lambda name, value, **kw: logged.__setitem__(name, value),
        clip_gradients=lambda optimizer, **kw: clipped.append(kw))
    return module, torch.optim.SGD([weight], lr=0.1), logged, clipped


# ---- NonFiniteGuard -------------------------------------------------------------------------------------
def test_bad_steps_are_counted_a_finite_one_resets_the_run_and_the_third_in_a_row_stops():
    guard = NonFiniteGuard(max_bad_steps=3)
    guard.bad("loss is nan")
    guard.bad("loss is inf")
    assert (guard.skipped, guard.in_a_row) == (2, 2)
    module, opt, _, _ = one_parameter([1.0, 0.0])
    guard.before_optimizer_step(module, opt, None)  # a finite gradient: the run of bad steps is over
    assert (guard.skipped, guard.in_a_row) == (2, 0)
    guard.bad("loss is nan")
    guard.bad("loss is nan")
    with pytest.raises(RuntimeError, match=r"^3 steps in a row had a non-finite loss or gradient \(last: "
                                           r"gradient norm is inf\); stopping\. Lower the learning rate"):
        guard.before_optimizer_step(*one_parameter([float("inf"), 0.0])[:2], 1.0)
    assert (guard.skipped, guard.in_a_row) == (5, 3)


def test_clipping_by_hand():
    """Gradient (3, 4) has norm 5: clipped to norm 1 it is (0.6, 0.8); at max 10, or with no max, it stays."""
    for max_norm, expected in ((1.0, [0.6, 0.8]), (10.0, [3.0, 4.0]), (None, [3.0, 4.0])):
        module, opt, logged, clipped = one_parameter([3.0, 4.0])
        NonFiniteGuard(max_bad_steps=3).before_optimizer_step(module, opt, max_norm)
        assert float(logged["train/grad_norm"]) == pytest.approx(5.0)  # the norm before clipping
        torch.testing.assert_close(module.model.weight.grad, torch.tensor(expected), rtol=1e-6, atol=1e-6)
        assert clipped == []


def test_a_precision_plugin_with_its_own_clipping_gets_lightnings_path():
    class OwnClipping(Precision):
        def clip_grad_by_norm(self, optimizer, clip_val):
            raise AssertionError("called through module.clip_gradients only")

    module, opt, _, clipped = one_parameter([3.0, 4.0], OwnClipping())
    NonFiniteGuard(max_bad_steps=3).before_optimizer_step(module, opt, 1.0)
    assert clipped == [{"gradient_clip_val": 1.0, "gradient_clip_algorithm": "norm"}]
    torch.testing.assert_close(module.model.weight.grad, torch.tensor([3.0, 4.0]))  # not clipped by us


# ---- ExactResume ----------------------------------------------------------------------------------------
def resumable(warm_start: str | None = "runs/warmstart/abc123"):
    guard = NonFiniteGuard(max_bad_steps=3)
    return types.SimpleNamespace(guard=guard, device=torch.device("cpu"), warm_start_path=warm_start,
                                 stream=None)


def draws() -> tuple:
    return torch.rand(3).tolist(), random.random(), float(np.random.rand())


def test_a_checkpoint_restores_the_rngs_and_the_guards_counters():
    saved = resumable()
    saved.guard.skipped, saved.guard.in_a_row = 4, 1
    checkpoint: dict = {}
    ExactResume().on_save_checkpoint(None, saved, checkpoint)
    assert checkpoint["grpo_lab"]["warm_start"] == "abc123"  # the cache entry's name, not the path
    expected = draws()
    draws()  # the run goes on, then is resumed from the checkpoint
    loaded = resumable("elsewhere/runs/warmstart/abc123")
    ExactResume().on_load_checkpoint(None, loaded, checkpoint)
    assert draws() == expected
    assert (loaded.guard.skipped, loaded.guard.in_a_row) == (4, 1)


def test_a_checkpoint_from_another_warm_start_is_refused():
    checkpoint: dict = {}
    ExactResume().on_save_checkpoint(None, resumable("runs/warmstart/abc123"), checkpoint)
    with pytest.raises(ValueError, match="checkpoint was trained from warm start 'abc123', this config gives "
                                         "'def456'"):
        ExactResume().on_load_checkpoint(None, resumable("runs/warmstart/def456"), checkpoint)


@pytest.mark.parametrize(("processed", "stepped", "after"), [(5, 5, 4), (5, 6, 4), (5, 4, 4), (0, 0, 0)])
def test_a_checkpoint_written_after_its_batch_is_stored_as_if_inside_it(processed, stepped, after):
    """Lightning adds 1 to the logging step on restart: a checkpoint whose batches_that_stepped already counts
    the last processed batch gets processed − 1, so the resumed curves do not skip a step."""
    checkpoint = {"loops": {"fit_loop": {"epoch_loop.state_dict": {"_batches_that_stepped": stepped},
                                         "epoch_loop.batch_progress": {"total": {"processed": processed}}}}}
    ExactResume().on_load_checkpoint(None, resumable(), checkpoint)
    assert checkpoint["loops"]["fit_loop"]["epoch_loop.state_dict"]["_batches_that_stepped"] == after
