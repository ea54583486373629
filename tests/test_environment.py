"""Importing grpo_lab changes nothing global; the entry points set the offline environment and the logging."""

import json
import os
import subprocess
import sys

from grpo_lab.environment import OFFLINE_ENV, child_env
from tests.conftest import ROOT

PROGRAM = """
import json, os
before = dict(os.environ)
import grpo_lab, grpo_lab.cli, grpo_lab.module, grpo_lab.variance
from transformers.utils import logging
on_import = {"environ_unchanged": dict(os.environ) == before, "verbosity": logging.get_verbosity()}
from grpo_lab.environment import configure_process
configure_process()
after = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM", "HF_DATASETS_OFFLINE")}
print(json.dumps({**on_import, "after": after, "verbosity_after": logging.get_verbosity()}))
"""


def test_importing_changes_nothing_and_configure_process_sets_up_the_process():
    env = {k: v for k, v in os.environ.items() if k not in OFFLINE_ENV and k != "TRANSFORMERS_VERBOSITY"}
    env["HF_DATASETS_OFFLINE"] = "0"  # the user's own value wins
    out = subprocess.run([sys.executable, "-c", PROGRAM], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["environ_unchanged"] and got["verbosity"] == 30  # transformers' default, WARNING
    assert got["after"] == {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                            "HF_DATASETS_OFFLINE": "0"}
    assert got["verbosity_after"] == 40  # ERROR


def test_child_env_fills_in_what_is_unset_and_extra_wins():
    env = child_env({"PATH": "/bin", "HF_HUB_OFFLINE": "0"}, PYTHONWARNINGS="ignore", PATH="/usr/bin")
    assert env["HF_HUB_OFFLINE"] == "0" and env["TRANSFORMERS_OFFLINE"] == "1"
    assert env["PYTHONWARNINGS"] == "ignore" and env["PATH"] == "/usr/bin"
    assert set(OFFLINE_ENV) <= set(env)
