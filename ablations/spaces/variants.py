"""The `field` space's arms: the field's GRPO variants (docs/variants.md), one factor at a time around
GRPO.

Data only (ablations/spaces/space.py registers the space). The baseline arm `grpo` is group_norm, token-level
clip 0.2, token_mean, beta 0. Two settings are common to every arm so that each variant can act at all:
mu = 2 (at mu = 1 the ratio is exactly 1 and GSPO, CISPO and dual-clip have GRPO's gradient) and
max_new_tokens = 6 (a 2-token overlong buffer then only reaches completions longer than any correct answer).
The probe measures the advantage estimators on the same rollouts (the weighted baselines get the rollout's
log-probabilities, as in training).
"""

from __future__ import annotations

from typing import Any

PROBE_ESTIMATORS = ("reward", "mean_baseline", "group_norm", "rloo", "batch_norm", "batch_whiten",
                    "james_stein", "gradient_weighted")
OVERLONG = {"model.rewards": ["exact_match", "overlong_penalty"], "model.overlong_buffer": 2}
VARIANTS: dict[str, dict[str, Any]] = {
    "grpo": {},
    "gspo": {"model.importance_level": "sequence"},
    "cispo": {"model.objective": "cispo"},
    "dual_clip_3": {"model.dual_clip": 3.0},
    "entropy_0.01": {"model.entropy_coef": 0.01},
    "top_entropy_0.2": {"model.top_entropy_quantile": 0.2},
    "kl_loss_0.04": {"model.beta": 0.04},
    "kl_reward_0.04": {"model.beta": 0.04, "model.kl_in": "reward"},
    # no std, no length norm
    "dr_grpo": {"model.advantage": "mean_baseline", "model.aggregation": "constant"},
    "rloo": {"model.advantage": "rloo"},
    "batch_norm": {"model.advantage": "batch_norm"},
    "batch_whiten": {"model.advantage": "batch_whiten"},
    "james_stein": {"model.advantage": "james_stein"},
    "gradient_weighted": {"model.advantage": "gradient_weighted"},
    "overlong": dict(OVERLONG),
    "overlong_normalized": {**OVERLONG, "model.reward_aggregation": "normalize_then_sum"},
    "dynamic_sampling": {"model.dynamic_sampling": True, "model.max_resample_rounds": 3},
}

