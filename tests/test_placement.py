"""ablations/runner/placement.py on a fake device list: k-device trials, several trials per device, a dead
worker's
device freed, a refusal when a trial needs more devices than there are; and its wiring into the runner
(the trial runner, the worker pool, grpo-lab-ablate's flags) without a GPU."""

import random
import threading
import time

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from ablations.run import main
from ablations.runner.placement import (
    DeviceSlots,
    Placement,
    check_fits,
    choose,
    devices_needed,
    make_placement,
    physical_ids,
    worker_devices,
)
from ablations.runner.study_loop import devices_per_trial
from ablations.runner.trial import TrialRunner
from ablations.runner.worker import WorkerDied, WorkerPool
from ablations.spaces.space import get_space
from grpo_lab.system.errors import UserError


# ---- the command line's choices ------------------------------------------------------------------------
def test_make_placement_reads_devices_and_refuses_mistakes():
    assert make_placement("cpu", "auto", 1, 0) is None  # trials run where their config says
    assert make_placement("gpu", "auto", 2, 3) == Placement(("0", "1", "2"), 2)
    assert make_placement("gpu", "2,0", 1, 3).devices == ("2", "0")
    assert make_placement("gpu", "0,1", 1, 2, visible="4,5").devices == ("4", "5")  # the runner's own mask
    assert physical_ids([1], None) == ("1",)
    assert make_placement("gpu", "auto", 3, 2).capacity == 6
    for args, message in [(("gpu", "auto", 1, 0), "no CUDA GPU is visible"),
                          (("gpu", "0,0", 1, 2), "distinct GPU indices"),
                          (("gpu", "x", 1, 2), "indices separated by commas"),
                          (("gpu", "0,2", 1, 2), "GPU 2 does not exist, this machine shows 2"),
                          (("gpu", "auto", 0, 2), "--trials-per-device must be >= 1"),
                          (("cpu", "0", 1, 0), "add --accelerator gpu"),
                          (("tpu", "auto", 1, 0), "give one of cpu, gpu")]:
        with pytest.raises(UserError, match=message):
            make_placement(*args)


def test_devices_needed_from_trainer_devices():
    assert [devices_needed(v) for v in (1, "2", 2, [0, 1], "0,1", "auto", -1, None, "-1")] == \
        [1, 2, 2, 2, 2, 1, 1, 1, 1]


def test_a_space_with_trials_on_more_devices_than_given_is_refused():
    needed = devices_per_trial(get_space("strategies"))  # single, ddp1, ddp2 x seeds
    assert sorted(set(needed)) == [1, 2]
    check_fits(needed, Placement(("0", "1")))
    with pytest.raises(UserError, match="runs on 2 devices .* --devices gives 1 \\(3\\)"):
        check_fits(needed, Placement(("3",), trials_per_device=4))


# ---- the slots -----------------------------------------------------------------------------------------
def test_choose_takes_the_least_loaded_devices_with_room():
    assert choose({"0": 0, "1": 0, "2": 0}, 2, 1) == ["0", "1"]
    assert choose({"0": 1, "1": 0, "2": 1}, 2, 2) == ["1", "0"]
    assert choose({"0": 1, "1": 1}, 1, 1) is None
    assert choose({"0": 1, "1": 0}, 2, 1) is None


def test_k_device_trials_and_several_trials_per_device():
    slots = DeviceSlots(Placement(("0", "1", "2"), trials_per_device=2))
    assert slots.acquire("ddp", 2) == ["0", "1"]
    assert slots.acquire("a", 1) == ["2"]
    assert slots.acquire("b", 1) == ["0"]  # every device has one trial: the first in order takes another
    assert slots.acquire("c", 1) == ["1"]
    assert slots.acquire("d", 1) == ["2"]
    assert slots.load() == {"0": 2, "1": 2, "2": 2}
    assert slots.acquire("e", 1, timeout=0.05) is None  # full: it waits
    assert slots.release("ddp") == ["0", "1"]
    assert slots.acquire("ddp2", 2) == ["0", "1"]
    with pytest.raises(ValueError, match="already holds"):
        slots.acquire("a", 1)


def test_a_trial_needing_more_devices_than_there_are_is_refused_not_queued():
    slots = DeviceSlots(Placement(("0", "1"), trials_per_device=4))
    with pytest.raises(ValueError, match="needs 3 devices, the placement has 2"):
        slots.acquire("big", 3)
    assert slots.held() == {}


def test_a_dead_workers_devices_are_freed_for_the_next_trial():
    slots = DeviceSlots(Placement(("0",)))
    with pytest.raises(WorkerDied), slots.hold("trial 0", 1) as devices:
        assert devices == ["0"] and slots.load() == {"0": 1}
        raise WorkerDied("worker 123 ended with status -9 during a trial")
    assert slots.load() == {"0": 0} and slots.held() == {}
    with slots.hold("trial 1", 1) as devices:
        assert devices == ["0"]


def test_a_waiting_trial_starts_when_devices_are_freed_and_no_slot_is_ever_given_twice():
    slots = DeviceSlots(Placement(("0", "1", "2"), trials_per_device=2))
    over, rng = [], random.Random(0)
    plan = [rng.choice([1, 1, 2, 3]) for _ in range(60)]

    def trial(i: int, k: int) -> None:
        with slots.hold(i, k) as devices:
            load = slots.load()
            if len(set(devices)) != k or any(v > 2 or v < 0 for v in load.values()):
                over.append((i, devices, load))
            time.sleep(0.001 * rng.random())

    threads = [threading.Thread(target=trial, args=(i, k)) for i, k in enumerate(plan)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not over and not any(t.is_alive() for t in threads)
    assert slots.load() == {"0": 0, "1": 0, "2": 0}


def test_workers_are_started_round_robin_over_the_devices():
    assert worker_devices(Placement(("0", "1"), 2), 3) == {"0": 2, "1": 1}
    assert worker_devices(Placement(("0", "1"), 1), 8) == {"0": 1, "1": 1}


# ---- the runner ----------------------------------------------------------------------------------------
class FakeWorker:
    def __init__(self, devices, die=False):
        self.devices, self.die, self.calls, self.closed = devices, die, [], False

    def alive(self):
        return not self.closed

    def run(self, argv, log, env):
        self.calls.append((argv, env))
        if self.die:
            self.closed = True
            raise WorkerDied("worker 1 ended with status -9 during a trial")
        return 0

    def close(self, timeout=30.0):
        self.closed = True


def test_the_pool_hands_out_workers_of_the_trials_devices_and_replaces_a_dead_one(tmp_path, monkeypatch):
    started = []

    def start(self, devices=None):
        started.append(FakeWorker(devices, die=len(started) == 1))  # the second dies
        return started[-1]

    monkeypatch.setattr(WorkerPool, "_start", start)
    pool = WorkerPool(1, tmp_path / "workers.log")
    assert pool.run(["fit"], tmp_path / "a.log", {}, "1") == 0
    assert pool.run(["fit"], tmp_path / "b.log", {}, "1") == 0  # the same worker again
    assert [w.devices for w in started] == ["1"]
    with pytest.raises(WorkerDied):
        pool.run(["fit"], tmp_path / "c.log", {}, "0")  # a worker of device 0 (the one that dies)
    assert pool.run(["fit"], tmp_path / "d.log", {}, "0") == 0  # replaced by a fresh one of device 0
    assert [w.devices for w in started] == ["1", "0", "0"]
    assert len(started[0].calls) == 2 and len(started[1].calls) == len(started[2].calls) == 1
    pool.close()


class FakePool:
    def __init__(self, die=False):
        self.die, self.calls = die, []

    def run(self, argv, log, env=None, devices=None):
        self.calls.append({"argv": argv, "env": env, "devices": devices})
        if self.die:
            raise WorkerDied("worker 7 ended with status -9 during a trial")
        return 0


@pytest.mark.parametrize("die", [False, True])
def test_a_placed_trial_runs_on_its_gpu_records_it_and_frees_it(tmp_path, die):
    space = get_space("smoke")
    slots = DeviceSlots(Placement(("3", "5")))
    pool = FakePool(die)
    trial_runner = TrialRunner(space, tmp_path / "study", tmp_path, probe=False, pool=pool, slots=slots)
    study = optuna.create_study(direction="maximize", sampler=space.sampler())
    study.optimize(trial_runner, n_trials=1, catch=(Exception,))  # a fake fit logs nothing: FitFailed anyway
    (t,) = study.get_trials()
    assert t.state == TrialState.FAIL
    assert t.user_attrs["devices"] == ["3"] and t.user_attrs["accelerator"] == "gpu"
    (call,) = pool.calls
    assert call["devices"] == "3" and call["env"]["CUDA_VISIBLE_DEVICES"] == "3"
    overlay = yaml.safe_load((tmp_path / "study").rglob("trial.yaml").__next__().read_text())
    assert overlay["trainer"]["accelerator"] == "gpu" and overlay["trainer"]["devices"] == 1
    assert slots.held() == {} and slots.load() == {"3": 0, "5": 0}  # freed, the dead worker's too


def test_gpu_flags_without_a_gpu_are_one_error_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("ablations.run.visible_device_count", lambda: 0)
    for argv, message in [(["--accelerator", "gpu"], "error: --accelerator gpu: no CUDA GPU is visible here"),
                          (["--devices", "0,1"], "error: --devices '0,1' places trials on GPUs: add "
                                                 "--accelerator gpu")]:
        with pytest.raises(SystemExit) as exit_:
            main(["--space", "smoke", "--root", str(tmp_path), "--no-report", *argv])
        assert exit_.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(message), err
