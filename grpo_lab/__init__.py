"""grpo_lab: GRPO from first principles on PyTorch Lightning.

Importing it changes nothing global: the programs set up their process in ``grpo_lab.system.process_env``.
"""

__version__ = "0.1.0"
