"""Several optimizer updates on one rollout batch: μ = ``num_iterations`` > 1 and/or ``micro_batches`` > 1.

With μ > 1, π_old is the policy that sampled the batch: its log-probabilities are computed once, before the
first update, and every update's importance ratio is taken against them (PPO's reuse of a batch). With
micro-batches, each update's loss and backward run over chunks of whole groups (a group's prompt is
forwarded once) and the gradients accumulate; every chunk divides by the *whole* batch's normalizer and
uses the whole batch's high-entropy tokens, so the accumulated gradient is the full batch's. Both run under
Lightning's manual optimization (``GRPOModule.automatic_optimization`` is off then).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from grpo_lab.losses import high_entropy_mask
from grpo_lab.rollout import Rollout, sequence_logprobs

if TYPE_CHECKING:
    from grpo_lab.config import RLConfig
    from grpo_lab.train.phase_timer import PhaseTimer


class SeveralUpdates:
    """``several_updates`` for a GRPOModule. A mixin: the annotations below are what it uses of its host,
    declared so a reader sees the contract (``tests/test_module.py`` checks that GRPOModule provides each and
    that the mixin uses nothing else of ``self``)."""

    rl: RLConfig
    model: torch.nn.Module
    timer: PhaseTimer
    loss: Callable[..., tuple[Tensor, dict]]  # GRPOModule.loss: one (micro-)batch's loss and statistics
    normalizer: Callable[[Tensor], Tensor]  # GRPOModule.normalizer: the whole batch's denominator
    optimizers: Callable[[], Any]  # LightningModule's, under manual optimization
    manual_backward: Callable[[Tensor], None]  # LightningModule's

    def several_updates(self, rollout: Rollout, advantages: Tensor) -> tuple[Tensor, dict]:
        """μ optimizer steps on one rollout batch, each accumulated over ``micro_batches`` chunks; the summed
        loss of the last update and its statistics."""
        rl, opt = self.rl, self.optimizers()
        old = entropy_mask = None
        if rl.num_iterations > 1 or rl.top_entropy_quantile < 1:  # π_old frozen before the first update
            with torch.no_grad(), self.timer("old_logprobs"):
                old, ent = sequence_logprobs(self.model, rollout, rl.temperature,
                                             token_entropy=rl.top_entropy_quantile < 1)  # [B, T]
            if ent is not None:  # the high-entropy tokens of the whole batch, not of each micro-batch
                entropy_mask = high_entropy_mask(ent, rollout.completion_mask, rl.top_entropy_quantile)
            old = old if rl.num_iterations > 1 else None
        norm = self.normalizer(rollout.completion_mask)
        b, g = advantages.shape[0], rollout.group_size
        # whole groups: their prompt is forwarded once
        step = math.ceil(math.ceil(b / rl.micro_batches) / g) * g
        for _ in range(rl.num_iterations):
            opt.zero_grad()
            total, stats = 0.0, {}
            for lo in range(0, b, step):
                rows = slice(lo, lo + step)
                loss, stats = self.loss(rollout.select(rows), advantages[rows],
                                        None if old is None else old[rows], norm,
                                        None if entropy_mask is None else entropy_mask[rows])
                self.manual_backward(loss)
                total = total + loss.detach()
            opt.step()  # on_before_optimizer_step drops a non-finite gradient: the step changes nothing
        return total, stats
