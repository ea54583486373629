"""Ablation harness for grpo_lab: named search spaces -> resumable Optuna studies -> a report.

- ``spaces.py``: the registry of named spaces (grids of grpo-lab config keys x seeds, or TPE distributions);
- ``objective.py``: one trial = one ``grpo-lab fit`` subprocess; its scalars become the trial's user attrs;
- ``run.py``: ``grpo-lab-ablate``: study creation on SQLite or any RDB URL, resume, parallel workers;
- ``report.py``: ``report.md`` and PNG plots from the study's COMPLETE trials only.
"""

# The built-in spaces (default, smoke, objectives, ...) register into ablations.spaces.SPACES: the package
# imports them, so that the registry (spaces.py) never imports what registers into it, and any
# ``from ablations.spaces import SPACES`` sees them.
from ablations import builtin_spaces  # noqa: F401
