"""Importing grpo_lab changes nothing global; the entry points set the offline environment and the logging."""

import json
import os
import subprocess
import sys

from grpo_lab.system.process_env import OFFLINE_ENV, child_env
from tests.conftest import ROOT

PROGRAM = """
import json, os
import lightning, torch, transformers  # they set their own variables on import: not ours to check
before = dict(os.environ)
import grpo_lab, grpo_lab.cli, grpo_lab.module, grpo_lab.variance
from transformers.utils import logging
on_import = {"environ_unchanged": dict(os.environ) == before, "verbosity": logging.get_verbosity()}
from grpo_lab.system.process_env import configure_process
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


def test_trial_and_worker_environments_come_from_the_one_rule(tmp_path, monkeypatch):
    """A trial's fit (``launch.launch``) and a worker (``WorkerPool.env``) get the offline variables, the
    thread count and the parent-death request from ``grpo_lab.system.process_env`` and
    ``grpo_lab.system.processes``."""
    from ablations.runner.launch import launch
    from ablations.runner.worker import WorkerPool
    from grpo_lab.system import processes
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")  # the user's own value wins here too
    worker = WorkerPool(3, tmp_path / "workers.log").env()
    proc = launch([sys.executable, "-c", "import json, os; print(json.dumps(dict(os.environ)))"],
                  tmp_path / "fit.log", 3, env={"MKL_NUM_THREADS": "5"})
    assert proc.wait(timeout=60) == 0
    fit = json.loads((tmp_path / "fit.log").read_text())
    for env in (worker, fit):
        assert {k: env[k] for k in OFFLINE_ENV} == {**OFFLINE_ENV, "TRANSFORMERS_OFFLINE": "0"}
        assert env["OMP_NUM_THREADS"] == "3" and env[processes.PARENT_ENV] == str(os.getpid())
    assert worker["MKL_NUM_THREADS"] == "3" and fit["MKL_NUM_THREADS"] == "5"  # launch's env= wins
