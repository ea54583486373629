"""GRPOModule: one training step is rollout -> reward -> advantage -> loss. The math lives elsewhere.

What this implements, top to bottom (README "The derivation" has the why):

1. Rollout: for each of the P queries of the batch sample G completions from the current policy
   (temperature, ``max_new_tokens``, stop at EOS) -> B = P·G sequences.
2. Reward: the configured reward functions score each completion -> rewards ``[P, G]``; their mean is
   the Monte-Carlo estimate of the surrogate J(θ) (``train/reward``).
3. Advantage: a registered estimator turns rewards into advantages ``[P, G]`` (``advantages.py``).
4. Loss: the clipped-ratio policy loss with optional KL to a frozen reference (``losses.py``), then
   ``num_iterations`` optimizer updates on this one rollout batch.

Departures from textbook GRPO, all configurable:
- default ``aggregation="token_mean"`` (DAPO/TRL) rather than the original ``sequence_mean``;
- default ``beta=0`` (no reference model is built then), as in DAPO / Dr. GRPO / current TRL;
- with ``num_iterations=1`` π_old is the detached current policy (ratio 1, the REINFORCE gradient) and no
  extra forward pass is spent on old log-probabilities; with μ > 1 they are computed once before the
  updates and the steps run under manual optimization;
- ``aggregation="constant"`` divides by B·``max_new_tokens`` (Dr. GRPO's fixed normalizer), and under
  DDP ``token_mean`` divides by the global token count, so 1 and N processes give the same gradient.
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import grad_norm
from torch import Tensor
from torchmetrics import MeanMetric

from grpo_lab.advantages import compute_advantages, get_estimator, zero_spread
from grpo_lab.errors import UserError, UserRuntimeError
from grpo_lab.losses import AGGREGATIONS, KL_ESTIMATORS, policy_loss
from grpo_lab.policy import PolicyConfig, build_policy
from grpo_lab.registry import lookup
from grpo_lab.rewards import check_reward_columns, load_reward, score
from grpo_lab.rollout import Rollout, generate, sequence_logprobs
from grpo_lab.tasks import Query
from grpo_lab.warmstart import WarmStartConfig, ensure_warm_start


def _numpy_state() -> tuple:
    """numpy's global RNG state as plain Python data (checkpoints load with weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)


class GRPOModule(L.LightningModule):
    def __init__(
        self,
        policy: PolicyConfig = PolicyConfig(),
        warm_start: WarmStartConfig = WarmStartConfig(),
        rewards: list[str] = ["exact_match"],  # noqa: B006 (read-only; LightningCLI needs a literal)
        reward_weights: list[float] | None = None,
        advantage: str = "group_norm",
        num_generations: int = 8,
        max_new_tokens: int = 4,
        min_new_tokens: int = 0,
        temperature: float = 1.0,
        clip_low: float = 0.2,
        clip_high: float = 0.2,
        beta: float = 0.0,
        kl_estimator: str = "k3",
        aggregation: str = "token_mean",
        num_iterations: int = 1,
        micro_batches: int = 1,
        max_grad_norm: float | None = 1.0,
        mask_truncated: bool = False,
        invalid_rewards: str = "error",
        max_bad_steps: int = 5,
        optimizer: OptimizerCallable | None = None,
        num_text_samples: int = 8,
    ) -> None:
        """GRPO on a causal LM.

        Args:
            policy: the network: a tiny Llama built from sizes, or a local HF directory.
            warm_start: supervised warm start on the task before RL (cached under ``runs/warmstart``).
            rewards: reward functions by registry name (``exact_match``, ``numeric_match``) or import path
                ``package.module:function``; their weighted sum is the reward.
            reward_weights: one weight per reward function (default all 1).
            advantage: advantage estimator: reward, mean_baseline, group_norm, rloo, batch_norm, any
                registered with ``@register_advantage``, or an import path ``package.module:function``.
            num_generations: G, completions sampled per query.
            max_new_tokens: longest completion; a completion without EOS by then is truncated.
            min_new_tokens: suppress EOS before this many tokens (benchmarks use it for fixed-length work).
            temperature: sampling temperature (log-probabilities in the loss use the same one).
            clip_low: ε_low of the clipped ratio, ratio >= 1 - clip_low (must be < 1).
            clip_high: ε_high of the clipped ratio, ratio <= 1 + clip_high.
            beta: KL coefficient to a frozen reference copy of the starting policy (0: no reference built).
            kl_estimator: per-token KL estimator: k1, k2, k3, or an import path ``package.module:function``.
            aggregation: token_mean, sequence_mean (original GRPO), constant (Dr. GRPO), or an import path
                ``package.module:function`` (its normalizer is the sequence count, as for sequence_mean).
            num_iterations: μ, optimizer updates per rollout batch (> 1 uses manual optimization).
            micro_batches: split each rollout batch's loss and backward into (at most) this many chunks of
                whole groups (gradient accumulation with the whole batch's normalizer: same gradient, less
                memory). Use this rather than the Trainer's accumulate_grad_batches.
            max_grad_norm: clip the gradient's global L2 norm to this (None: no clipping).
            mask_truncated: leave completions that never reached EOS out of the loss (they still count
                in the reward metrics).
            invalid_rewards: ``error`` stops on a NaN/inf/non-number reward; ``drop`` leaves that completion
                out of the loss (its reward is set to its group's mean, advantage 0) and counts it in
                ``train/invalid_rewards``.
            max_bad_steps: a step whose loss or gradient is not finite is skipped (weights untouched,
                counted in ``train/skipped_steps``); this many in a row stop the run with an error.
            optimizer: optimizer class or callable taking the parameters (YAML ``class_path``/``init_args``);
                default AdamW(lr=5e-4).
            num_text_samples: completions logged as text to TensorBoard at each validation.
        """
        super().__init__()
        # LightningCLI may hand nested dataclasses over as dicts: normalise once, keep typed copies.
        self.policy_cfg = policy if isinstance(policy, PolicyConfig) else PolicyConfig(**policy)
        self.warm_start_cfg = warm_start if isinstance(warm_start, WarmStartConfig) else WarmStartConfig(**warm_start)
        estimator = get_estimator(advantage)
        lookup(AGGREGATIONS, aggregation, "aggregation")
        lookup(KL_ESTIMATORS, kl_estimator, "KL estimator")
        if estimator.needs_group and num_generations < 2:
            raise UserError(f"advantage {advantage!r} needs num_generations >= 2 (got {num_generations}); or use 'reward'")
        if min(num_generations, num_iterations, max_new_tokens, micro_batches) < 1:
            raise UserError("num_generations, num_iterations, micro_batches and max_new_tokens must be >= 1")
        if not 0.0 <= clip_low < 1.0 or clip_high < 0.0:
            raise UserError(f"need 0 <= clip_low < 1 and clip_high >= 0, got {clip_low}, {clip_high}")
        if beta < 0.0:
            raise UserError(f"beta must be >= 0, got {beta}")
        if temperature <= 0.0:
            raise UserError(f"temperature must be > 0, got {temperature}")
        if invalid_rewards not in ("error", "drop"):
            raise UserError(f"invalid_rewards must be 'error' or 'drop', got {invalid_rewards!r}")
        self.save_hyperparameters()
        # Keep hparams plain data so checkpoints load with torch's weights_only=True.
        self.hparams.update(policy=asdict(self.policy_cfg), warm_start=asdict(self.warm_start_cfg))
        if callable(self.hparams.get("optimizer")):  # LightningCLI stores the config dict; code passes a callable
            self.hparams["optimizer"] = getattr(optimizer, "__qualname__", repr(optimizer))
        self.optimizer_fn = optimizer
        self.automatic_optimization = num_iterations == 1 and micro_batches == 1
        self.reward_fns = [load_reward(r) for r in rewards]
        self.model, self.tokenizer = build_policy(self.policy_cfg, seed=self.warm_start_cfg.seed)
        self._ref: list[torch.nn.Module] = []  # frozen reference, kept out of state_dict and DDP
        self.warm_start_path: str | None = None
        self.val_metrics = torch.nn.ModuleDict()
        self.skipped_steps, self._bad_in_a_row, self._invalid_rewards = 0, 0, 0

    # ---- set-up -------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if self.trainer.accumulate_grad_batches > 1:
            raise UserError(
                "trainer.accumulate_grad_batches > 1 would average per-rollout normalized losses; "
                "use model.micro_batches to accumulate within a rollout batch with its global normalizer"
            )
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and getattr(dm, "train_set", None):
            check_reward_columns(self.reward_fns, dm.train_set + dm.val_set, dm.hparams.dataset)
        if self.warm_start_cfg.steps > 0 and dm is not None and self.warm_start_path is None:
            self.warm_start_path = str(self._warm_start(dm.hparams.dataset))
            weights = type(self.model).from_pretrained(self.warm_start_path, local_files_only=True).state_dict()
            self.model.load_state_dict(weights)
        if self.hparams.beta > 0 and not self._ref:
            self._ref.append(copy.deepcopy(self.model).eval().requires_grad_(False))

    def _warm_start(self, dataset: str):
        strategy = self.trainer.strategy
        if strategy.is_global_zero:
            ensure_warm_start(self.policy_cfg, self.warm_start_cfg, dataset)
        strategy.barrier("warm_start")
        return ensure_warm_start(self.policy_cfg, self.warm_start_cfg, dataset)

    def configure_optimizers(self):
        make = self.optimizer_fn or (lambda params: torch.optim.AdamW(params, lr=5e-4, weight_decay=0.0))
        return make(self.model.parameters())

    # ---- the four steps -----------------------------------------------------------------------------
    def rollout(self, batch: list[Query], num_generations: int | None = None, greedy: bool = False) -> Rollout:
        h = self.hparams
        return generate(
            self.model, self.tokenizer, [q["prompt"] for q in batch], num_generations or h.num_generations,
            h.max_new_tokens, h.temperature, greedy=greedy, min_new_tokens=h.min_new_tokens,
        )

    def reward(self, rollout: Rollout, batch: list[Query]) -> Tensor:
        """Rewards ``[P, G]`` of the rollout's completions; reward functions see the query columns.
        With ``invalid_rewards="drop"`` an invalid value gets its group's mean and leaves the loss."""
        g = len(rollout.completions) // len(batch)
        columns = {k: [q[k] for q in batch for _ in range(g)] for k in batch[0] if k != "prompt" and not k.startswith("_")}
        drop = self.hparams.invalid_rewards == "drop"
        r = score(self.reward_fns, rollout.completions, columns, self.hparams.reward_weights, allow_invalid=drop)
        r = r.view(len(batch), g).to(self.device)
        invalid = ~torch.isfinite(r)  # [P, G]; only possible with drop
        if invalid.any():
            valid_mean = torch.where(invalid, 0.0, r).sum(-1, keepdim=True) / (~invalid).sum(-1, keepdim=True).clamp(min=1)
            r = torch.where(invalid, valid_mean, r)
            rollout.completion_mask[invalid.flatten()] = 0
        self._invalid_rewards = int(invalid.sum())
        return r

    def loss(
        self, rollout: Rollout, advantages: Tensor, old_logprobs: Tensor | None, normalizer: float | Tensor | None = None
    ) -> tuple[Tensor, dict]:
        """The GRPO loss on (a micro-batch of) one rollout batch; ``old_logprobs=None`` means π_old = π_θ
        (μ = 1). ``normalizer``: the aggregation's denominator for the whole batch (default: this one's)."""
        h = self.hparams
        logprobs, entropy = sequence_logprobs(self.model, rollout, h.temperature, with_entropy=True)  # [B, T]
        ref = None
        if self._ref:
            with torch.no_grad():
                ref, _ = sequence_logprobs(self._ref[0].to(self.device), rollout, h.temperature)
        loss, stats = policy_loss(
            logprobs, logprobs.detach() if old_logprobs is None else old_logprobs, advantages,
            rollout.completion_mask, clip_low=h.clip_low, clip_high=h.clip_high, ref_logprobs=ref, beta=h.beta,
            kl_estimator=h.kl_estimator, aggregation=h.aggregation,
            normalizer=self.normalizer(rollout.completion_mask) if normalizer is None else normalizer,
        )
        stats["entropy"] = entropy
        return loss, stats

    def normalizer(self, mask: Tensor, reduce: bool = True) -> Tensor:
        """The aggregation's denominator for a rollout batch with completion mask ``mask`` [B, T], chosen so
        that 1 process, N DDP processes (gradients averaged) and micro-batches all give the same gradient:
        token_mean: global token count / N; sequence_mean: global sequences / N; constant: that × max_new_tokens.
        ``reduce=False`` gives this process's own count (no collective call: safe on one rank alone).
        """
        agg = self.hparams.aggregation
        count = mask.sum().float() if agg == "token_mean" else mask.new_tensor(float(mask.shape[0]))
        world = 1
        if reduce and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            count = count.float().clone()
            dist.all_reduce(count)
            world = dist.get_world_size()
        count = count.float().clamp(min=1.0) / world
        return count * self.hparams.max_new_tokens if agg == "constant" else count

    def training_step(self, batch: list[Query], batch_idx: int) -> Tensor | None:
        start = time.perf_counter()
        rollout = self.rollout(batch)  # B = P·G completions, no grad
        if self.hparams.mask_truncated:
            rollout.completion_mask[rollout.truncated] = 0
        rewards = self.reward(rollout, batch)  # [P, G]
        advantages = compute_advantages(rewards, self.hparams.advantage).flatten()  # [P, G] -> [B]
        if self.automatic_optimization:  # μ = 1: ratio = π_θ/π_θ.detach(), the REINFORCE gradient
            loss, stats = self.loss(rollout, advantages, old_logprobs=None)
        else:  # μ > 1 (π_old frozen before several updates on one batch) and/or micro-batches
            loss, stats = self._several_updates(rollout, advantages)
        self._log_step(batch, rollout, rewards, advantages, loss, stats, time.perf_counter() - start)
        if self.automatic_optimization and not torch.isfinite(loss):
            self._bad_step(f"loss is {loss.item()}")
            return None  # Lightning skips backward and the optimizer step
        return loss if self.automatic_optimization else None

    def _several_updates(self, rollout: Rollout, advantages: Tensor) -> tuple[Tensor, dict]:
        """μ optimizer steps on one rollout batch, each accumulated over ``micro_batches`` chunks."""
        h, opt = self.hparams, self.optimizers()
        old = None
        if h.num_iterations > 1:  # π_old frozen before the first update
            with torch.no_grad():
                old, _ = sequence_logprobs(self.model, rollout, h.temperature)
        norm = self.normalizer(rollout.completion_mask)
        b, g = advantages.shape[0], rollout.group_size
        step = math.ceil(math.ceil(b / h.micro_batches) / g) * g  # whole groups: their prompt is forwarded once
        for _ in range(h.num_iterations):
            opt.zero_grad()
            total, stats = 0.0, {}
            for lo in range(0, b, step):
                rows = slice(lo, lo + step)
                loss, stats = self.loss(rollout.select(rows), advantages[rows], None if old is None else old[rows], norm)
                self.manual_backward(loss)
                total = total + loss.detach()
            opt.step()  # on_before_optimizer_step drops a non-finite gradient: the step changes nothing
        return total, stats

    def on_before_optimizer_step(self, optimizer) -> None:
        norms = grad_norm(self.model, norm_type=2)
        total = norms.get("grad_2.0_norm_total")
        if total is not None:
            self.log("train/grad_norm", total, on_step=True, on_epoch=False)
        if total is not None and not torch.isfinite(torch.as_tensor(total)):
            for p in self.model.parameters():  # optimizers skip parameters without a gradient
                p.grad = None
            self._bad_step(f"gradient norm is {float(total)}")
            return
        if total is None:  # no backward happened (a skipped loss): nothing to clip or count
            return
        self._bad_in_a_row = 0
        if self.hparams.max_grad_norm is not None:
            self.clip_gradients(optimizer, gradient_clip_val=self.hparams.max_grad_norm, gradient_clip_algorithm="norm")

    def _bad_step(self, why: str) -> None:
        self.skipped_steps += 1
        self._bad_in_a_row += 1
        if self._bad_in_a_row >= self.hparams.max_bad_steps:
            raise UserRuntimeError(
                f"{self._bad_in_a_row} steps in a row had a non-finite loss or gradient (last: {why}); stopping. "
                "Lower the learning rate, check the reward function, or raise model.max_bad_steps"
            )

    # ---- checkpoints: everything needed to continue exactly -----------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["grpo_lab"] = {
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": _numpy_state()},
            "skipped_steps": self.skipped_steps, "bad_in_a_row": self._bad_in_a_row,
            "warm_start": self.warm_start_path and Path(self.warm_start_path).name,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Lightning adds 1 to the logging step on restart, assuming the checkpoint was written inside a batch;
        # one written at the end of an epoch or fit already counts that batch, so the resumed run's curves
        # would skip a step. Store it as if written inside the batch.
        loop = checkpoint.get("loops", {}).get("fit_loop", {})
        if "epoch_loop.state_dict" in loop and "epoch_loop.batch_progress" in loop:
            processed = loop["epoch_loop.batch_progress"]["total"]["processed"]
            stepped = loop["epoch_loop.state_dict"].get("_batches_that_stepped", 0)
            if processed and stepped >= processed:
                loop["epoch_loop.state_dict"]["_batches_that_stepped"] = processed - 1
        state = checkpoint.get("grpo_lab")
        if state is None:
            return
        ws = self.warm_start_path and Path(self.warm_start_path).name
        if state["warm_start"] != ws:
            raise UserError(f"checkpoint was trained from warm start {state['warm_start']!r}, this config gives {ws!r}")
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        kind, keys, pos, has_gauss, gauss = state["rng"]["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
        self.skipped_steps, self._bad_in_a_row = state["skipped_steps"], state["bad_in_a_row"]

    # ---- logging ------------------------------------------------------------------------------------
    def _log_step(self, batch, rollout: Rollout, rewards: Tensor, advantages: Tensor, loss: Tensor, stats: dict, seconds: float) -> None:
        p = len(batch)
        metrics = {
            "train/reward": rewards.mean(),
            "train/frac_zero_std": zero_spread(rewards).float().mean(),
            "train/advantage_mean": advantages.mean(),
            "train/advantage_std": advantages.std() if advantages.numel() > 1 else advantages.new_zeros(()),
            "train/advantage_min": advantages.min(),
            "train/advantage_max": advantages.max(),
            "train/loss": loss.detach(),
            "train/completion_length": rollout.completion_mask.sum(-1).float().mean(),
            "train/truncated_fraction": rollout.truncated.float().mean(),
            "train/skipped_steps": torch.tensor(float(self.skipped_steps)),
            "train/invalid_rewards": torch.tensor(float(self._invalid_rewards)),
            "perf/tokens_per_s": torch.tensor(rollout.num_tokens / max(seconds, 1e-9)),
        }
        metrics.update({f"train/{k}": v for k, v in stats.items() if v is not None})
        by_difficulty = defaultdict(list)
        for q, r in zip(batch, rewards.mean(-1), strict=True):
            if "difficulty" in q:
                by_difficulty[str(q["difficulty"])].append(r)
        for d, rs in by_difficulty.items():
            metrics[f"train/reward_{d}"] = torch.stack(rs).mean()
        self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=p, prog_bar=False)
        self.log("reward", metrics["train/reward"], prog_bar=True, on_step=True, on_epoch=False, logger=False, batch_size=p)

    # ---- validation: greedy and sampled accuracy per difficulty --------------------------------------
    def validation_step(self, batch: list[Query], batch_idx: int) -> None:
        # Sampled with its own seed: validation never moves the training RNG (exact resume, same samples).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.global_step * 7919 + batch_idx)
            self._validate(batch, batch_idx)

    def _validate(self, batch: list[Query], batch_idx: int) -> None:
        texts = []
        for mode in ("greedy", "sampled"):
            rollout = self.rollout(batch, num_generations=1, greedy=mode == "greedy")
            hits = self.reward(rollout, batch).squeeze(-1)  # [P]
            for q, hit in zip(batch, hits, strict=True):
                for key in (mode, f"{mode}_{q.get('difficulty', 'all')}"):
                    self._val_metric(key).update(hit)
            if mode == "greedy" and batch_idx == 0:
                texts = [f"`{q['prompt']}` → `{c}` (reward {r:.2f})" for q, c, r in zip(batch, rollout.completions, hits.tolist(), strict=True)]
        for key, metric in self.val_metrics.items():
            self.log(f"val/acc_{key}", metric, on_step=False, on_epoch=True, batch_size=len(batch), prog_bar=key == "greedy")
        if texts and self.hparams.num_text_samples and hasattr(self.logger, "experiment") and hasattr(self.logger.experiment, "add_text"):
            self.logger.experiment.add_text("samples/greedy", "  \n".join(texts[: self.hparams.num_text_samples]), self.global_step)

    def _val_metric(self, key: str) -> MeanMetric:
        if key not in self.val_metrics:
            self.val_metrics[key] = MeanMetric().to(self.device)
        return self.val_metrics[key]
