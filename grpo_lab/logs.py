"""The old name of ``grpo_lab.tensorboard_scalars``, until ``ablations/objective.py`` imports the new one."""

from grpo_lab.tensorboard_scalars import learning_lift, read_scalars

__all__ = ["learning_lift", "read_scalars"]
