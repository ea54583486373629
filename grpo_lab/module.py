"""GRPOModule: one training step is rollout -> reward -> advantage -> loss. The math lives elsewhere.

What this implements, top to bottom (docs/derivation.md has the why):

1. Rollout: for each of the P queries of the batch sample G completions from the current policy
   (temperature, ``max_new_tokens``, stop at EOS) -> B = P·G sequences.
2. Reward: the configured reward functions score each completion -> rewards ``[P, G]``
   (``rewards/scoring.py``); their mean is the Monte-Carlo estimate of J(θ) (``train/reward``). With dynamic
   sampling the groups without spread are replaced by fresh queries (``data/dynamic_sampling.py``); with
   ``kl_in="reward"`` β·KL of each completion is subtracted here.
3. Advantage: a registered estimator (a center and a scale) turns rewards into advantages ``[P, G]``
   (``advantages.py``).
4. Loss: the policy loss and its variants with optional KL to a frozen reference (``losses.py``), then
   ``num_iterations`` optimizer updates on this one rollout batch.

Every setting is a field of :class:`~grpo_lab.config.RLConfig`. Departures from textbook GRPO, all
configurable:
- default ``aggregation="token_mean"`` (DAPO/TRL) rather than the original ``sequence_mean``;
- default ``beta=0`` (no reference model is built then), as in DAPO / Dr. GRPO / current TRL;
- with ``num_iterations=1`` π_old is the detached current policy (ratio 1, the REINFORCE gradient) and no
  extra forward pass is spent on old log-probabilities; with μ > 1 they are computed once before the
  updates and the steps run under manual optimization;
- ``aggregation="constant"`` divides by B·``max_new_tokens`` (Dr. GRPO's fixed normalizer), and under
  DDP ``token_mean`` divides by the global token count, so 1 and N processes give the same gradient;
- ``top_entropy_quantile`` chooses its tokens once per rollout batch (π_old's entropies), so micro-batches
  give the full batch's gradient; under DDP each process chooses among its own tokens.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor

from grpo_lab.advantages import rollout_advantages
from grpo_lab.config import RLConfig
from grpo_lab.data.dynamic_sampling import QueryStream, Sample, dynamic_sample
from grpo_lab.data.tasks import Query
from grpo_lab.decode import Decoder, enable_tf32
from grpo_lab.losses import aggregation_normalizer, policy_loss, sequence_kl
from grpo_lab.model.policy import PolicyConfig, build_policy
from grpo_lab.model.warmstart import WarmStartConfig, load_weights, shared_warm_start
from grpo_lab.rewards.scoring import check_reward_columns, load_reward, score_groups
from grpo_lab.rollout import Rollout, generate, sequence_logprobs
from grpo_lab.system.errors import UserError, UserRuntimeError
from grpo_lab.train.callbacks import ExactResume, NonFiniteGuard
from grpo_lab.train.distributed import min_over_processes, sum_over_processes, world_size
from grpo_lab.train.metrics import step_metrics
from grpo_lab.train.phase_timer import PhaseTimer
from grpo_lab.train.updates import SeveralUpdates
from grpo_lab.train.validation import SampledAccuracy


class GRPOModule(SampledAccuracy, SeveralUpdates, L.LightningModule):
    def __init__(
        self,
        policy: PolicyConfig = PolicyConfig(),
        warm_start: WarmStartConfig = WarmStartConfig(),
        optimizer: OptimizerCallable | None = None,
        num_text_samples: int = 8,
        **settings,
    ) -> None:
        """GRPO on a causal LM.

        Args:
            policy: the network: a tiny Llama built from sizes, or a local HF directory.
            warm_start: supervised warm start on the task before RL (cached under ``runs/warmstart``).
            optimizer: optimizer class or callable taking the parameters (YAML ``class_path``/``init_args``);
                default AdamW(lr=5e-4).
            num_text_samples: completions logged as text to TensorBoard at each validation.
            settings: the RL settings, the fields of ``grpo_lab.config.RLConfig`` (flat: ``advantage=``,
                ``clip_high=``, ...); each is listed with its help under ``grpo-lab fit --help``.
        """
        super().__init__()
        # LightningCLI may hand nested dataclasses over as dicts: normalise once, keep typed copies.
        self.policy_cfg = policy if isinstance(policy, PolicyConfig) else PolicyConfig(**policy)
        ws = warm_start
        self.warm_start_cfg = ws if isinstance(ws, WarmStartConfig) else WarmStartConfig(**ws)
        self.rl = RLConfig(**settings)
        self.estimator = self.rl.estimator
        self.loss_settings = self.rl.loss_settings()  # built and checked once, read by every loss call
        self.reward_fns = [load_reward(r) for r in self.rl.rewards]
        self.save_hyperparameters()
        # Keep hparams plain data (checkpoints load with torch's weights_only=True), every setting flat.
        self.hparams.update(policy=asdict(self.policy_cfg), warm_start=asdict(self.warm_start_cfg),
                            **asdict(self.rl))
        # LightningCLI stores a config dict; code passes a callable
        if callable(self.hparams.get("optimizer")):
            self.hparams["optimizer"] = getattr(optimizer, "__qualname__", repr(optimizer))
        self.optimizer_fn = optimizer
        self.automatic_optimization = self.rl.num_iterations == 1 and self.rl.micro_batches == 1
        self.model, self.tokenizer = build_policy(self.policy_cfg, seed=self.warm_start_cfg.seed)
        self._ref: list[torch.nn.Module] = []  # frozen reference, kept out of state_dict and DDP
        self.warm_start_path: str | None = None
        self.stream: QueryStream | None = None  # fresh queries for dynamic sampling (set up from the data)
        self.val_metrics = torch.nn.ModuleDict()
        self.guard, self._invalid_rewards = NonFiniteGuard(self.rl.max_bad_steps), 0
        self.timer = PhaseTimer()  # the step's named phases; off unless a profiler turns it on
        self._decoder: Decoder | None = None  # built at the first rollout, when the device is known

    @property
    def skipped_steps(self) -> int:
        return self.guard.skipped

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
            if self.rl.dynamic_sampling and self.stream is None:
                self.stream = QueryStream(dm.train_set, seed=dm.hparams.seed * 1009 + self.global_rank)
        if self.warm_start_cfg.steps > 0 and dm is not None and self.warm_start_path is None:
            path = shared_warm_start(self.trainer.strategy, self.policy_cfg, self.warm_start_cfg,
                                     dm.hparams.dataset)
            self.warm_start_path = str(path)
            load_weights(self.model, path)
        if self.rl.beta > 0 and not self._ref:
            self._ref.append(copy.deepcopy(self.model).eval().requires_grad_(False))

    def configure_optimizers(self):
        make = self.optimizer_fn or (lambda params: torch.optim.AdamW(params, lr=5e-4, weight_decay=0.0))
        return make(self.model.parameters())

    def configure_callbacks(self) -> list[L.Callback]:
        return [ExactResume()]

    # ---- the four steps -----------------------------------------------------------------------------
    def training_step(self, batch: list[Query], batch_idx: int) -> Tensor | None:
        start = time.perf_counter()
        sample = self.sample(batch)  # rollout -> reward [P', G]; dynamic sampling refills zero-spread groups
        rewards, stats = sample.rewards, {}
        if self.rl.kl_in == "reward":  # r - β·KL(o) per completion, before the advantage
            kl = self.sequence_kl(sample.rollout).view_as(rewards)
            rewards, stats["kl_reward"] = rewards - self.rl.beta * kl, kl.mean()
        with self.timer("advantage"):
            advantages = self.advantages(sample.rollout, rewards)  # [P', G] -> [B']
        with self.timer("loss"):
            if self.automatic_optimization:  # μ = 1: ratio = π_θ/π_θ.detach(), the REINFORCE gradient
                loss, loss_stats = self.loss(sample.rollout, advantages, old_logprobs=None)
            else:  # μ > 1 (π_old frozen before several updates on one batch) and/or micro-batches
                loss, loss_stats = self.several_updates(sample.rollout, advantages)
        with self.timer("metrics"):
            self._log_step(sample, advantages, loss, {**stats, **loss_stats}, time.perf_counter() - start)
        if self.automatic_optimization and not torch.isfinite(loss):
            self.guard.bad(f"loss is {loss.item()}")
            return None  # Lightning skips backward and the optimizer step
        return loss if self.automatic_optimization else None

    def rollout(self, batch: list[Query], num_generations: int | None = None,
                greedy: bool = False) -> Rollout:
        rl = self.rl
        return generate(
            self.model, self.tokenizer, [q["prompt"] for q in batch], num_generations or rl.num_generations,
            rl.max_new_tokens, rl.temperature, greedy=greedy, min_new_tokens=rl.min_new_tokens,
            decoder=self.decoder,
        )

    @property
    def decoder(self) -> Decoder:
        """The rollout's decoder for the model's device (``RLConfig.decode_settings``); TF32 is switched on
        with the first one when ``tf32`` is set."""
        if self._decoder is None or self._decoder.device != self.device:
            self._decoder = Decoder(self.rl.decode_settings(self.device), self.device)
            if self.rl.tf32:
                enable_tf32(self.device)
        return self._decoder

    def reward(self, rollout: Rollout, batch: list[Query], aggregation: str | None = None) -> Tensor:
        """Rewards ``[P, G]`` of the rollout's completions (``aggregation`` overrides the configured one)."""
        return self.score(rollout, batch, aggregation)[0]

    def score(self, rollout: Rollout, batch: list[Query],
              aggregation: str | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``(rewards, j_rewards, invalid)`` ``[P, G]`` (``rewards.score_groups``): the reward functions
        combined by ``reward_aggregation`` (what the advantage sees) and by their weighted sum (J's rewards),
        and where a value was invalid. Reward functions see the query columns and the rollout's
        (``rewards.ROLLOUT_COLUMNS``). With ``invalid_rewards="drop"`` an invalid value gets its group's mean;
        ``rollout.without(invalid)`` leaves it out of the loss."""
        rl, g = self.rl, len(rollout.completions) // len(batch)
        mask = rollout.completion_mask
        length = torch.where(rollout.truncated, rl.max_new_tokens, mask.sum(-1))  # [B], EOS included
        r, j, invalid = score_groups(
            self.reward_fns, batch, rollout.completions, g, weights=rl.reward_weights,
            aggregation=aggregation or rl.reward_aggregation, allow_invalid=rl.invalid_rewards == "drop",
            device=self.device, completion_length=length.tolist(), truncated=rollout.truncated.tolist(),
            max_new_tokens=rl.max_new_tokens, overlong_buffer=rl.overlong_tokens)  # [P, G] each
        self._invalid_rewards += int(invalid.sum())
        return r, j, invalid

    def sample(self, batch: list[Query]) -> Sample:
        """rollout -> reward for the data loader's batch; with ``dynamic_sampling`` its zero-spread groups are
        replaced by groups of fresh queries (``sampling.dynamic_sample``)."""
        self._invalid_rewards = 0
        rollout, rewards, j_rewards = self._rollout_and_reward(batch)
        if not self.rl.dynamic_sampling:
            return Sample(batch, rollout, rewards, batch, j_rewards, sampled_tokens=rollout.num_tokens)
        if self.stream is None:
            raise UserRuntimeError("dynamic_sampling draws fresh queries from the training set: fit with a "
                               "QueryDataModule, or set module.stream to a "
                               "grpo_lab.data.dynamic_sampling.QueryStream")
        return dynamic_sample(batch, rollout, rewards, lambda q: self._rollout_and_reward(q)[:2],
                              self.stream.draw, self.rl.max_resample_rounds, self.tokenizer.pad_token_id,
                              lambda kept: min_over_processes(kept, self.device), seen_rewards=j_rewards)

    def _rollout_and_reward(self, batch: list[Query]) -> tuple[Rollout, Tensor, Tensor]:
        with self.timer("rollout"):
            rollout = self.rollout(batch)  # B = P·G completions, no grad
        if self.rl.mask_truncated:
            rollout = rollout.without(rollout.truncated)
        with self.timer("reward"):
            rewards, j_rewards, invalid = self.score(rollout, batch)  # [P, G]
        return rollout.without(invalid.flatten()), rewards, j_rewards

    def sequence_kl(self, rollout: Rollout) -> Tensor:
        """k1 of each completion to the reference ``[B]``: Σ_t log π_old(o_t) − log π_ref(o_t) (for
        ``kl_in="reward"``)."""
        with torch.no_grad(), self.timer("reference"):
            ref, _ = sequence_logprobs(self._ref[0].to(self.device), rollout, self.rl.temperature)
        return sequence_kl(rollout.logprobs, ref, rollout.completion_mask)

    def advantages(self, rollout: Rollout, rewards: Tensor) -> Tensor:
        """Advantages ``[B]`` for rewards ``[P, G]`` (a weighted baseline gets its weights here)."""
        return rollout_advantages(rewards, self.estimator, rollout.logprobs, rollout.completion_mask)

    def loss(
        self, rollout: Rollout, advantages: Tensor, old_logprobs: Tensor | None,
        normalizer: float | Tensor | None = None, entropy_mask: Tensor | None = None,
    ) -> tuple[Tensor, dict]:
        """The policy loss on (a micro-batch of) one rollout batch; ``old_logprobs=None`` means π_old = π_θ
        (μ = 1). ``normalizer``: the aggregation's denominator for the whole batch (default: this one's);
        ``entropy_mask``: the high-entropy tokens chosen for the whole batch (default: among these)."""
        rl = self.rl
        per_token = rl.entropy_coef > 0 or (rl.top_entropy_quantile < 1 and entropy_mask is None)
        logprobs, entropy = sequence_logprobs(self.model, rollout, rl.temperature, with_entropy=True,
                                              token_entropy=per_token,
                                              share_prompts=self.decoder.settings.share_prompts)  # [B, T]
        ref = None
        if self._ref and rl.kl_in == "loss":
            with torch.no_grad(), self.timer("reference"):
                ref, _ = sequence_logprobs(self._ref[0].to(self.device), rollout, rl.temperature)
        with self.timer("policy_loss"):
            loss, stats = policy_loss(
                logprobs, logprobs.detach() if old_logprobs is None else old_logprobs, advantages,
                rollout.completion_mask, self.loss_settings, ref_logprobs=ref,
                normalizer=self.normalizer(rollout.completion_mask) if normalizer is None else normalizer,
                entropy=entropy if per_token else None, entropy_mask=entropy_mask,
            )
        m = rollout.completion_mask.float()
        stats["entropy"] = (entropy.detach() * m).sum() / m.sum().clamp(min=1) if per_token else entropy
        return loss, stats

    def normalizer(self, mask: Tensor, reduce: bool = True) -> Tensor:
        """The aggregation's denominator for a rollout batch with completion mask ``mask`` [B, T], counted
        over all processes (``losses.aggregation_normalizer``); ``reduce=False``: this process's own count
        (no collective call: safe on one rank alone)."""
        return aggregation_normalizer(self.rl.aggregation, mask, self.rl.max_new_tokens,
                                      total=sum_over_processes if reduce else None,
                                      world=world_size() if reduce else 1)

    def backward(self, loss: Tensor, *args, **kwargs) -> None:
        with self.timer("backward"):
            super().backward(loss, *args, **kwargs)

    def on_before_optimizer_step(self, optimizer) -> None:
        with self.timer("clip"):  # the gradient norm, the non-finite check and the clipping
            self.guard.before_optimizer_step(self, optimizer, self.rl.max_grad_norm)

    def _log_step(self, sample: Sample, advantages: Tensor, loss: Tensor, stats: dict,
                  seconds: float) -> None:
        counters = {"skipped_steps": self.guard.skipped, "invalid_rewards": self._invalid_rewards}
        if self.rl.dynamic_sampling:
            counters.update(resample_rounds=sample.rounds, dropped_groups=sample.dropped)
        metrics = step_metrics(sample, advantages, loss, stats, seconds, counters)
        p = len(sample.seen_queries)
        self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=p, prog_bar=False)
        self.log("reward", metrics["train/reward"], prog_bar=True, on_step=True, on_epoch=False, logger=False,
                 batch_size=p)
