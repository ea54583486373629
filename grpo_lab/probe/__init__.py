"""The gradient-variance probe: ``stats`` (pure math on gradients and their Gram matrices), ``gradients``
(every estimator's gradient on one shared rollout), ``core`` (the probe at fixed parameters), ``cache`` (one
probe per policy) and ``callback`` (the Lightning callback). ``python -m grpo_lab.variance`` is its command
line."""

from grpo_lab.probe.callback import GradientVarianceProbe
from grpo_lab.probe.core import DEFAULT_ESTIMATORS, probe, relative_half_width
from grpo_lab.probe.gradients import batch_gradients, estimator_gradients
from grpo_lab.probe.gram_stats import GramAccumulator, gradient_statistics, gram_statistics, snr_intervals

__all__ = ["DEFAULT_ESTIMATORS", "GradientVarianceProbe", "GramAccumulator", "batch_gradients",
           "estimator_gradients", "gradient_statistics", "gram_statistics", "probe", "relative_half_width",
           "snr_intervals"]
