"""RLConfig: every setting of the RL algorithm (rewards, sampling, advantage, loss, updates) in one dataclass.

``GRPOModule(policy=..., warm_start=..., **settings)`` builds ``RLConfig(**settings)``; jsonargparse follows
that ``**settings`` into this dataclass, so the flat flags and YAML keys stay what they always were
(``--model.advantage rloo``, ``model: {clip_high: 0.28}``) and ``grpo-lab fit --help`` lists each setting
with the text below. Validation happens here, once, when the module is built: a bad value is one
``ValueError`` naming the setting and what would be valid.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from grpo_lab.advantages import resolve_estimator
from grpo_lab.decode import DecodeSettings
from grpo_lab.losses import AGGREGATIONS, IMPORTANCE_LEVELS, KL_ESTIMATORS, OBJECTIVES, LossSettings
from grpo_lab.rewards.scoring import REWARD_AGGREGATIONS
from grpo_lab.system.errors import UserError
from grpo_lab.system.registry import lookup


@dataclass
class RLConfig:
    """The RL settings of GRPOModule (the defaults are textbook GRPO with token-mean aggregation).

    Args:
        rewards: reward functions by registry name (``exact_match``, ``numeric_match``, ``overlong_penalty``)
            or import path ``package.module:function``; combined by ``reward_aggregation``.
        reward_weights: one weight per reward function (default all 1).
        reward_aggregation: how several reward functions become one reward: ``weighted_sum`` (Σ w·r) or
            ``normalize_then_sum`` (each function normalized within its group first; GDPO, TRL
            multi_objective_aggregation).
        overlong_buffer: C of the ``overlong_penalty`` reward (DAPO's soft overlong punishment): the penalty
            ramps from 0 to -1 over the last C of ``max_new_tokens`` tokens (default max_new_tokens // 4,
            at least 1).
        invalid_rewards: ``error`` stops on a NaN/inf/non-number reward; ``drop`` leaves that completion
            out of the loss (its reward is set to its group's mean, advantage 0) and counts it in
            ``train/invalid_rewards``.
        num_generations: G, completions sampled per query.
        max_new_tokens: longest completion; a completion without EOS by then is truncated.
        min_new_tokens: suppress EOS before this many tokens (benchmarks use it for fixed-length work).
        temperature: sampling temperature (log-probabilities in the loss use the same one).
        mask_truncated: leave completions that never reached EOS out of the loss (they still count
            in the reward metrics).
        dynamic_sampling: DAPO's dynamic sampling: drop the groups whose G rewards are all equal and
            sample fresh queries (a seeded stream, checkpointed) until the batch is full again or
            ``max_resample_rounds`` are spent; the loss normalizer counts the kept batch.
        max_resample_rounds: most refill rounds per step with ``dynamic_sampling`` (each samples as many
            fresh queries as groups are missing).
        advantage: advantage estimator: reward, mean_baseline, group_norm, rloo, batch_norm, batch_whiten,
            james_stein, gradient_weighted, opo, maxrl, online_coef, baseline_coef, any registered with
            ``@register_advantage``, or an import path ``package.module:function``.
        advantage_center: replace the baseline of the ``advantage`` preset: none, group, leave_one_out,
            batch, james_stein (shrunk toward the other queries), gradient_weighted (weighted by a
            gradient-norm proxy), length_weighted (OPO), online_coef (the batch's variance-optimal c).
            Default: the preset's.
        advantage_scale: replace the divisor of the ``advantage`` preset: none, group (std of the group),
            batch (std of the batch), mean (the group's mean reward: MaxRL). Default: the preset's.
        baseline_coef: c of the ``baseline_coef`` advantage, A_i = r_i − c·(leave-one-out mean): 0 is
            ``reward``, 1 is ``rloo``, unbiased for every c (the probe's baseline map measures c*).
        objective: per-token policy objective: ``clip`` (PPO/GRPO) or ``cispo`` (clipped, stop-gradient
            importance weight times A·log π; MiniMax-M1).
        importance_level: ``token`` (a ratio per token) or ``sequence`` (GSPO: one length-normalized ratio
            per completion).
        clip_low: ε_low of the clipped ratio, ratio >= 1 - clip_low (must be < 1).
        clip_high: ε_high of the clipped ratio, ratio <= 1 + clip_high.
        dual_clip: dual-clip PPO's c > 1: for A < 0 the per-token loss is at most -c·A (None: off).
        beta: KL coefficient to a frozen reference copy of the starting policy (0: no reference built).
        kl_estimator: per-token KL estimator in the loss: k1, k2, k3, or an import path
            ``package.module:function``.
        kl_in: where the KL penalty goes: ``loss`` (β·KL per token in the loss) or ``reward`` (β·k1 of the
            whole completion subtracted from its reward before the advantage; verl use_kl_in_reward).
        entropy_coef: entropy bonus: -entropy_coef·H per token in the loss (0: off).
        top_entropy_quantile: ρ of the "80/20" rule: only the top ρ share of tokens by entropy enter the
            policy term (1: all tokens; the paper uses 0.2).
        aggregation: token_mean, sequence_mean (original GRPO), constant (Dr. GRPO), or an import path
            ``package.module:function`` (its normalizer is the sequence count, as for sequence_mean).
        num_iterations: μ, optimizer updates per rollout batch (> 1 uses manual optimization).
        micro_batches: split each rollout batch's loss and backward into (at most) this many chunks of
            whole groups (gradient accumulation with the whole batch's normalizer: same gradient, less
            memory). Use this rather than the Trainer's accumulate_grad_batches.
        max_grad_norm: clip the gradient's global L2 norm to this (None: no clipping).
        max_bad_steps: a step whose loss or gradient is not finite is skipped (weights untouched,
            counted in ``train/skipped_steps``); this many in a row stop the run with an error.
        kv_cache: the rollout's KV cache: ``dynamic`` (transformers' default: grows by a copy per token),
            ``sliced`` (a preallocated buffer, attention over its filled prefix: the same numbers, no
            copies) or ``static`` (fixed slots, fixed shapes: what a compiled step needs; equal to float
            rounding). Default: sliced on CPU, static on a GPU.
        compile_decode: torch.compile the rollout's one-token step over the static cache (on a GPU with
            ``mode="reduce-overhead"``: a CUDA graph per shape); a failing compilation is logged and the
            step runs eagerly. Default: on for a GPU, off on CPU (compiling costs minutes there and the
            compiled step was slower on the bench shape).
        compile_backend: torch.compile backend of ``compile_decode`` (``inductor``; ``aot_eager`` to check
            tracing without code generation).
        stop_check_every: check for "every completion has ended" every k tokens (each check waits for the
            device). The rollout is the same for any k; the steps after the last EOS draw random numbers,
            so later draws differ. Default: 1 on CPU, 8 on a GPU.
        share_prompts: forward each prompt once per group (its KV cache repeated G times) in the rollout's
            prefill and the loss forward: fewer FLOPs, more kernels. Default: on for CPU, off on a GPU.
        tf32: let fp32 matmuls on a GPU use TF32 (``torch.set_float32_matmul_precision("high")``;
            process-wide). No effect on CPU or in bf16.
    """

    rewards: list[str] = field(default_factory=lambda: ["exact_match"])
    reward_weights: list[float] | None = None
    reward_aggregation: str = "weighted_sum"
    overlong_buffer: int | None = None
    invalid_rewards: str = "error"
    num_generations: int = 8
    max_new_tokens: int = 4
    min_new_tokens: int = 0
    temperature: float = 1.0
    mask_truncated: bool = False
    dynamic_sampling: bool = False
    max_resample_rounds: int = 3
    advantage: str = "group_norm"
    advantage_center: str | None = None
    advantage_scale: str | None = None
    baseline_coef: float = 1.0
    objective: str = "clip"
    importance_level: str = "token"
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = None
    beta: float = 0.0
    kl_estimator: str = "k3"
    kl_in: str = "loss"
    entropy_coef: float = 0.0
    top_entropy_quantile: float = 1.0
    aggregation: str = "token_mean"
    num_iterations: int = 1
    micro_batches: int = 1
    max_grad_norm: float | None = 1.0
    max_bad_steps: int = 5
    kv_cache: str | None = None
    compile_decode: bool | None = None
    compile_backend: str = "inductor"
    stop_check_every: int | None = None
    share_prompts: bool | None = None
    tf32: bool = False

    def __post_init__(self) -> None:
        estimator = resolve_estimator(self.advantage, self.advantage_center, self.advantage_scale,
                                      self.baseline_coef)
        for registry, name, what in ((AGGREGATIONS, self.aggregation, "aggregation"),
                                     (KL_ESTIMATORS, self.kl_estimator, "KL estimator"),
                                     (OBJECTIVES, self.objective, "objective"),
                                     (IMPORTANCE_LEVELS, self.importance_level, "importance level"),
                                     (REWARD_AGGREGATIONS, self.reward_aggregation, "reward aggregation")):
            lookup(registry, name, what)
        if estimator.needs_group and self.num_generations < 2:
            raise UserError(
                f"advantage {self.advantage!r} needs num_generations >= 2 (got {self.num_generations}); or "
                "use 'reward'"
            )
        if min(self.num_generations, self.num_iterations, self.max_new_tokens, self.micro_batches) < 1:
            raise UserError("num_generations, num_iterations, micro_batches and max_new_tokens must be >= 1")
        self.loss_settings()  # checks the loss's values
        if self.temperature <= 0.0:
            raise UserError(f"temperature must be > 0, got {self.temperature}")
        if self.invalid_rewards not in ("error", "drop"):
            raise UserError(f"invalid_rewards must be 'error' or 'drop', got {self.invalid_rewards!r}")
        if self.kl_in not in ("loss", "reward"):
            raise UserError(f"kl_in must be 'loss' or 'reward', got {self.kl_in!r}")
        if self.kl_in == "reward" and self.beta <= 0.0:
            raise UserError("kl_in='reward' needs beta > 0 (the KL coefficient of the reward penalty)")
        if self.reward_weights is not None and len(self.reward_weights) != len(self.rewards):
            raise UserError(f"reward_weights has {len(self.reward_weights)} weights for {len(self.rewards)} "
                            "rewards")
        if self.max_resample_rounds < 0 or (self.overlong_buffer is not None and
                                            not 1 <= self.overlong_buffer <= self.max_new_tokens):
            raise UserError(f"need max_resample_rounds >= 0 and 1 <= overlong_buffer <= max_new_tokens, got "
                             f"{self.max_resample_rounds} and {self.overlong_buffer}")
        try:
            self.decode_settings("cpu")
        except ValueError as err:
            raise UserError(str(err)) from None

    def loss_settings(self) -> LossSettings:
        """The policy loss's settings: this config's fields of the names ``LossSettings`` declares (the
        same names, so a loss setting added there is read from here without a second list)."""
        return LossSettings(**{f.name: getattr(self, f.name) for f in fields(LossSettings)})

    def decode_settings(self, device: torch.device | str) -> DecodeSettings:
        """How the rollout decodes on ``device``: the decode fields, each unset one following the device."""
        return DecodeSettings.for_device(device, self.kv_cache, self.compile_decode, self.compile_backend,
                                         self.stop_check_every, self.share_prompts)

    @property
    def estimator(self):
        """The advantage estimator: the ``advantage`` preset with ``advantage_center``/``advantage_scale``."""
        return resolve_estimator(self.advantage, self.advantage_center, self.advantage_scale,
                                 self.baseline_coef)

    @property
    def overlong_tokens(self) -> int:
        """The overlong buffer C in tokens (``overlong_buffer`` or max_new_tokens // 4, at least 1)."""
        return self.overlong_buffer if self.overlong_buffer is not None else max(1, self.max_new_tokens // 4)
