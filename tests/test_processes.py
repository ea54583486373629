"""Every process a trial starts dies with the study runner (``grpo_lab.system.processes``), tested with real
SIGKILLs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ablations.spaces.space import Space
from grpo_lab.system import processes
from tests.conftest import ROOT, alive, process_commands

pytestmark = pytest.mark.skipif(not processes.supported(), reason="PR_SET_PDEATHSIG is Linux only")

# A `strategies`-like space with only the 2-process DDP point, on the smoke shapes, running "for ever" (the
# test kills it). Imported by the runner as --space tests.test_processes:DDP2.
DDP2 = Space(
    name="ddp2_kill",
    description="one 2-process DDP trial that runs until killed",
    grid={"strategy": ["ddp2"], "seed": [0]},
    presets={"strategy": {"ddp2": {"trainer.strategy": "ddp", "trainer.accelerator": "cpu",
                                   "trainer.devices": 2}}},
    base_config="configs/ablate_smoke.yaml",
    overrides={"trainer.max_steps": 100_000, "trainer.val_check_interval": 100_000,
               "model.warm_start.steps": 20},
    probe=None,
)


def _python(code: str, env: dict[str, str] | None = None, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code], env=env, cwd=ROOT, **kw)


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_die_with_parent_chains_through_grandchildren(tmp_path):
    """runner -> child -> grandchild, each started with ``child_env()`` and calling ``die_with_parent()``:
    SIGKILL of the runner takes both down, though the grandchild was not started by the runner."""
    pids, ready = tmp_path / "pids", tmp_path / "ready"
    grandchild = ("import time\nfrom grpo_lab.system.processes import die_with_parent\n"
                  "assert die_with_parent()\n"
                  f"open({str(ready)!r}, 'w').close()\ntime.sleep(60)\n")
    child = (
        "import subprocess, sys, time\nfrom grpo_lab.system.processes import die_with_parent\nassert "
        "die_with_parent()\n"
        # env inherited: the request passes on
        f"g = subprocess.Popen([sys.executable, '-c', {grandchild!r}])\n"
        f"open({str(pids)!r}, 'w').write(f'{{g.pid}}')\ntime.sleep(60)\n"
    )
    runner = (
        "import subprocess, sys, time\nfrom grpo_lab.system.processes import child_env\n"
        f"subprocess.Popen([sys.executable, '-c', {child!r}], env=child_env())\ntime.sleep(60)\n"
    )
    proc = _python(runner, start_new_session=True)
    try:
        gpid = int(_wait_for(lambda: pids.is_file() and pids.read_text(), 120, "the grandchild"))
        # importing grpo_lab takes seconds
        _wait_for(ready.is_file, 120, "the grandchild to call die_with_parent")
        children = [int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
        assert alive(gpid) and len(children) == 1
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        _wait_for(lambda: not alive(children[0]) and not alive(gpid), 10, "the child and grandchild to die")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)


def test_a_zombie_parent_counts_as_gone():
    zombie = _python("pass")
    _wait_for(lambda: not alive(zombie.pid), 60, "the child to exit")  # exited, not reaped: a zombie
    assert not processes._alive(zombie.pid) and processes._alive(os.getpid())
    zombie.wait()


def test_a_child_whose_parent_is_already_gone_exits():
    """The request names a parent that no longer exists (it died while the child was starting): exit 1."""
    dead = _python("pass")
    dead.wait()
    env = {**os.environ, processes.PARENT_ENV: str(dead.pid)}
    res = subprocess.run([sys.executable, "-c",
                          "from grpo_lab.system.processes import die_with_parent\ndie_with_parent()\n"
                          "print('survived')"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "survived" not in res.stdout
    assert f"parent process {dead.pid} is gone" in res.stderr


def test_without_the_request_nothing_changes():
    env = {k: v for k, v in os.environ.items() if k != processes.PARENT_ENV}
    res = subprocess.run([sys.executable, "-c", "from grpo_lab.system.processes import die_with_parent\n"
                          "print(die_with_parent())"], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == "False"


def _trial_processes(root: Path) -> list[int]:
    """Live processes whose command line is a fit of a trial under ``root`` (rank 0 and rank 1 alike)."""
    return [pid for pid, cmd in process_commands()
            if str(root) in cmd and "grpo_lab.cli fit" in cmd and alive(pid)]


@pytest.mark.slow
def test_sigkill_of_the_runner_kills_both_ranks_of_a_ddp_trial(tmp_path):
    """The runner is SIGKILLed as soon as the trial's fit has started its second rank, while that rank is
    still starting up. Rank 0 dies with the runner; rank 1, whose parent is then gone, must not go on to wait
    for a rendezvous with it (for torch's 30-minute timeout) but exit as soon as its entry point runs."""
    root = tmp_path / "runs"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "ablations.run", "--space", "tests.test_processes:DDP2", "--root", str(root),
           "--n-jobs", "1", "--no-report"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ranks = _wait_for(lambda: len(_trial_processes(root)) == 2 and _trial_processes(root), 300,
                          "rank 1 to start")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        # Rank 0 dies at once; rank 1 once it is through its imports (seconds; a minute on a loaded
        # machine) and reaches die_with_parent. Without it, rank 1 would wait for torch's 30-minute
        # rendezvous timeout.
        deadline = time.time() + 180
        while time.time() < deadline and any(alive(p) for p in ranks):
            time.sleep(0.2)
        survivors = [p for p in ranks if alive(p)]
        log = root / "ablate" / "ddp2_kill" / "0" / "fit.log"
        assert not survivors, (f"trial processes {survivors} outlived the runner; fit.log:\n"
                               f"{log.read_text()[-2000:]}")
    finally:
        for pid in _trial_processes(root):  # never leave a stray fit behind, whatever happened
            os.kill(pid, signal.SIGKILL)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
