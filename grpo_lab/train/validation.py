"""Validation of a GRPOModule: reward (exact-match accuracy) of one greedy and one sampled completion per
query, overall and per ``difficulty`` (``val/acc_{greedy,sampled}[_<difficulty>]``), and a few greedy
completions as text. A mixin: it uses the module's ``rollout`` and ``reward`` and keeps its metrics in
``val_metrics`` (:class:`SampledAccuracy` declares all it uses).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torchmetrics import MeanMetric

from grpo_lab.data.tasks import Query
from grpo_lab.system.rng import seeded

if TYPE_CHECKING:
    from grpo_lab.rollout import Rollout


class SampledAccuracy:
    """``validation_step`` for a GRPOModule. A mixin: the annotations below are what it uses of its host,
    declared so a reader sees the contract (``tests/test_module.py`` checks that GRPOModule provides each and
    that the mixin uses nothing else of ``self``)."""

    rollout: Callable[..., Rollout]  # GRPOModule.rollout(batch, num_generations=, greedy=)
    reward: Callable[..., torch.Tensor]  # GRPOModule.reward(rollout, batch, aggregation=) -> [P, G]
    val_metrics: torch.nn.ModuleDict  # its metrics, one MeanMetric per key, kept on the module's device
    # LightningModule's:
    hparams: Any  # num_text_samples
    global_step: int
    device: torch.device
    logger: Any
    log: Callable[..., None]

    def validation_step(self, batch: list[Query], batch_idx: int) -> None:
        # Sampled with its own seed: validation never moves the training RNG (exact resume, same samples).
        with seeded(self.global_step * 7919 + batch_idx, self.device):
            self._validate(batch, batch_idx)

    def _validate(self, batch: list[Query], batch_idx: int) -> None:
        texts = []
        for mode in ("greedy", "sampled"):
            rollout = self.rollout(batch, num_generations=1, greedy=mode == "greedy")
            hits = self.reward(rollout, batch, aggregation="weighted_sum").squeeze(-1)  # [P]
            for q, hit in zip(batch, hits, strict=True):
                for key in (mode, f"{mode}_{q.get('difficulty', 'all')}"):
                    self._val_metric(key).update(hit)
            if mode == "greedy" and batch_idx == 0:
                texts = [f"`{q['prompt']}` → `{c}` (reward {r:.2f})"
                         for q, c, r in zip(batch, rollout.completions, hits.tolist(), strict=True)]
        for key, metric in self.val_metrics.items():
            self.log(f"val/acc_{key}", metric, on_step=False, on_epoch=True, batch_size=len(batch),
                     prog_bar=key == "greedy")
        if texts and self.hparams.num_text_samples:
            writer = getattr(getattr(self.logger, "experiment", None), "add_text", None)
            if writer is not None:
                shown = "  \n".join(texts[: self.hparams.num_text_samples])
                writer("samples/greedy", shown, self.global_step)

    def _val_metric(self, key: str) -> MeanMetric:
        if key not in self.val_metrics:
            self.val_metrics[key] = MeanMetric().to(self.device)
        return self.val_metrics[key]
