"""Ablation harness for grpo_lab: named search spaces -> resumable Optuna studies -> a report with verdicts.

- ``spaces/``: the registry of named spaces (``space``) and the built-in ones (``builtin``, ``variants``,
  ``controls``, ``regimes``);
- ``runner/``: the study loop, storage, one trial (``trial``: what ``study.optimize`` calls), its process or
  worker, devices, duplicates, pruning, progress, the sequential rounds;
- ``report/``: trials as runs, statistics, the verdict rule, the family and controls, ``summary.json``, the
  markdown report and its plots;
- ``run.py``: ``grpo-lab-ablate``; ``calibration.py``: the verdicts' error rates by simulation.
"""

# The built-in spaces (default, smoke, objectives, ...) register into ablations.spaces.space.SPACES: the
# package imports them, so that the registry (spaces/space.py) never imports what registers into it, and any
# ``from ablations.spaces.space import SPACES`` sees them.
from ablations.spaces import builtin  # noqa: F401
