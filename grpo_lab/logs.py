"""The old name of ``grpo_lab.tensorboard_scalars``, kept for ``ablations/objective.py`` until it imports the new one."""

from grpo_lab.tensorboard_scalars import learning_lift, read_scalars

__all__ = ["learning_lift", "read_scalars"]
