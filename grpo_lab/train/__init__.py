"""The training loop's helpers around ``GRPOModule``: μ updates and micro-batches (``updates``), step metrics
(``metrics``), validation (``validation``), the gradient guard and clipping, exact resume (``callbacks``),
per-phase timers (``phase_timer``), per-step statistics (``stepstats``), reading TensorBoard scalars back
(``tensorboard_scalars``) and the cross-process reductions (``distributed``)."""
