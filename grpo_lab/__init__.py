"""grpo_lab: GRPO from first principles on PyTorch Lightning."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded from a model hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from transformers.utils import logging as _hf_logging  # noqa: E402

_hf_logging.disable_progress_bar()
_hf_logging.set_verbosity_error()

__version__ = "0.1.0"
