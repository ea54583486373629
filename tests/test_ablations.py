"""The ablation harness: spaces, statistics, duplicate handling, the report, and (slow) whole studies."""

from __future__ import annotations

import contextlib
import datetime
import glob
import json
import math
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState, create_trial

from ablations import objective as obj
from ablations.pruning import DEFAULT_PRUNER, StudyPruning, make_pruner, pruned_at
from ablations.report import paired_bootstrap, t_interval, t_quantile, write_report
from ablations.run import build_parser, make_storage, open_study, point_status, run_grid
from ablations.spaces import SPACES, ProbeSettings, Space, get_space
from ablations.tensorboard_runs import run_name
from grpo_lab.cli import cli_main
from grpo_lab.logs import read_scalars
from tests.conftest import CONFIGS, ROOT
from tests.test_tensorboard import hparams_table

optuna.logging.set_verbosity(optuna.logging.WARNING)


# ---- spaces ------------------------------------------------------------------------------------------
def _sample_points(space: Space) -> list[dict]:
    """One point per group (seed 0 only) of a grid space, or the distributions' lower ends."""
    if space.is_grid:
        return [p for p in space.points() if p.get("seed", 0) == space.grid.get("seed", [0])[0]]
    return [{k: getattr(d, "low", None) if hasattr(d, "low") else d.choices[0] for k, d in space.distributions.items()}]


@pytest.mark.parametrize("name", sorted(SPACES))
def test_every_space_builds_overlays_that_grpo_lab_loads(name, tmp_path):
    space = SPACES[name]
    for i, params in enumerate(_sample_points(space)):
        trial_dir = tmp_path / str(i)
        overlay = obj.write_overlay(obj.trial_overlay(space, params, trial_dir, tmp_path), trial_dir / "trial.yaml")
        cli = cli_main(["--config", obj.resolve_config(space.base_config), "--config", str(overlay)], run=False)
        for key, value in space.trial_overrides(params).items():  # every key is a real config key, and set
            assert cli.config[key] == value, (name, params, key)
        assert Path(cli.trainer.log_dir).resolve() == trial_dir.resolve()
        assert not cli.trainer.checkpoint_callbacks and not cli.trainer.progress_bar_callback
        probes = [c for c in cli.trainer.callbacks if type(c).__name__ == "GradientVarianceProbe"]
        assert len(probes) == (space.probe is not None)


def test_seed_sets_the_rl_seed_the_data_order_and_the_probe():
    space = SPACES["default"]
    over = space.trial_overrides({"model.advantage": "rloo", "seed": 2})
    assert over == {"model.advantage": "rloo", "seed_everything": 2, "data.seed": 2}
    cb = ProbeSettings().callback("rloo", 2)
    assert cb["class_path"] == "grpo_lab.variance.GradientVarianceProbe" and cb["init_args"]["seed"] == 2
    assert ProbeSettings(estimators="own").callback("rloo", 0)["init_args"]["estimators"] == ["rloo"]
    assert len(space.points()) == 12 and SPACES["strategies"].trial_overrides({"strategy": "ddp2"})["trainer.devices"] == 2
    # prompts_per_step is global: every strategy sees the same batch (the base config's)
    assert all("data.prompts_per_step" not in SPACES["strategies"].trial_overrides({"strategy": s, "seed": 0})
               for s in ("single", "ddp1", "ddp2"))


def test_space_registry_errors_and_import_paths(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="known: .*default"):
        get_space("nope")
    with pytest.raises(ValueError, match="exactly one of grid"):
        Space(name="x", description="", grid=None)
    with pytest.raises(ValueError, match="have no preset"):
        Space(name="x", description="", grid={"v": ["a", "b"]}, presets={"v": {"a": {}}})
    (tmp_path / "my_spaces.py").write_text(
        "from ablations.spaces import Space\n"
        "temp = Space(name='temp_test', description='t', grid={'model.temperature': [0.7, 1.0], 'seed': [0]})\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    space = get_space("my_spaces:temp")
    assert space.name == "temp_test" and SPACES.pop("temp_test") is space


def test_every_runner_flag_has_help():
    parser = build_parser()
    flags = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert {"space", "study", "storage", "n_jobs", "no_report", "report_only", "root"} <= {a.dest for a in flags}
    assert all(a.help and len(a.help) > 10 for a in flags)


# ---- statistics --------------------------------------------------------------------------------------
def test_t_quantiles_match_the_tables():
    for df, expected in [(1, 12.706), (2, 4.303), (4, 2.776), (30, 2.042), (1000, 1.962)]:
        assert t_quantile(0.975, df) == pytest.approx(expected, abs=1e-3)


def test_t_interval_by_hand():
    mean, lo, hi = t_interval([1.0, 2.0, 3.0])  # s = 1, n = 3: half-width 4.303 / sqrt(3)
    assert mean == 2.0 and hi - mean == pytest.approx(4.303 / math.sqrt(3), abs=1e-3) and mean - lo == pytest.approx(hi - mean)
    mean, lo, hi = t_interval([0.5])  # one seed: the mean, CI n/a
    assert mean == 0.5 and math.isnan(lo) and math.isnan(hi)
    assert all(math.isnan(v) for v in t_interval([]))


def test_paired_bootstrap_excludes_and_includes_zero():
    base = [0.30, 0.25, 0.40, 0.35, 0.20]
    better = [b + d for b, d in zip(base, [0.10, 0.12, 0.08, 0.11, 0.09], strict=True)]  # always ~+0.1
    mean, lo, hi = paired_bootstrap(better, base)
    assert mean == pytest.approx(0.10) and 0 < lo < 0.10 < hi
    noisy = [b + d for b, d in zip(base, [0.10, -0.12, 0.05, -0.04, 0.01], strict=True)]
    mean, lo, hi = paired_bootstrap(noisy, base)
    assert lo < 0 < hi
    assert paired_bootstrap(better, base) == paired_bootstrap(better, base)  # fixed seed: reproducible
    mean, lo, hi = paired_bootstrap([1.0], [0.0])
    assert mean == 1.0 and math.isnan(lo)


def test_curve_metrics_by_hand():
    line = [(s, s / 10) for s in range(11)]  # 0 -> 1 over 10 steps
    assert obj.auc(line) == pytest.approx(0.5) and obj.auc([(3, 0.2)]) == 0.2
    assert obj.steps_to_threshold(line, 0.5, window=3) == 6  # mean of steps 4, 5, 6 = 0.5
    assert obj.steps_to_threshold([(0, 1.0), (1, 0.0), (2, 0.0)], 0.9, window=3) is None  # a lucky start is not enough
    long = [(s, float(s % 2)) for s in range(1000)]
    small = obj.downsample(long)
    assert len(small) == 200 and np.mean([v for _, v in small]) == pytest.approx(0.5)
    assert obj.nest({"model.advantage": "rloo", "model.policy.hidden_size": 8}) == {
        "model": {"advantage": "rloo", "policy": {"hidden_size": 8}}}


def test_run_fit_raises_with_the_log_tail(tmp_path):
    with pytest.raises(obj.FitFailed, match="(?s)exited with 3.*boom"):
        obj.run_fit([sys.executable, "-c", "print('boom'); raise SystemExit(3)"], tmp_path / "a.log", threads=1)


# ---- pruning: optuna-integration's callback inside the fit process ------------------------------------
class _FakeTrainer:
    """What ``StudyPruning.on_validation_end`` reads from a Trainer."""

    def __init__(self, score, step):
        self.sanity_checking, self.is_global_zero, self.should_stop = False, True, False
        self.callback_metrics = {"val/acc_sampled": torch.tensor(score)}
        self.global_step = step
        self.strategy = types.SimpleNamespace(broadcast=lambda x: x)


def _tuning_study(tmp_path):
    url = f"sqlite:///{tmp_path / 'p.db'}"
    study = optuna.create_study(study_name="p", storage=make_storage(url), direction="maximize")
    return url, study, study.ask()


def test_study_pruning_reports_at_the_global_step_and_stops_the_fit(tmp_path):
    threshold = {"class_path": "optuna.pruners.ThresholdPruner", "init_args": {"lower": 0.5}}
    url, study, trial = _tuning_study(tmp_path)
    cb = StudyPruning(url, "p", trial.number, pruner=threshold)
    good, bad = _FakeTrainer(0.75, 10), _FakeTrainer(0.25, 20)
    cb.on_validation_end(good, None)
    assert not good.should_stop and pruned_at(trial) is None
    cb.on_validation_end(bad, None)  # below the threshold: pruned, marked, and the Trainer told to stop
    assert bad.should_stop and pruned_at(trial) == 20
    assert study.trials[0].intermediate_values == {10: 0.75, 20: 0.25}


def test_study_pruning_is_inert_on_a_finished_trial_and_checks_the_pruner(tmp_path):
    url, study, trial = _tuning_study(tmp_path)
    study.tell(trial, 1.0)
    with pytest.warns(UserWarning, match="not running"):
        cb = StudyPruning(url, "p", trial.number)  # rerunning a finished trial's trial.yaml by hand
    cb.on_validation_end(_FakeTrainer(0.0, 5), None)
    assert study.trials[0].intermediate_values == {}
    with pytest.raises(ValueError, match="not an optuna.pruners.BasePruner"):
        make_pruner({"class_path": "optuna.samplers.TPESampler"})
    assert isinstance(make_pruner(None), optuna.pruners.NopPruner)


def test_a_tuning_trial_overlay_carries_the_pruning_callback_and_a_grid_one_does_not(tmp_path):
    pruning = {"storage": "sqlite:///x.db", "study_name": "s", "trial_number": 3}
    tune, grid = SPACES["tune_lr"], SPACES["default"]
    cbs = obj.trial_overlay(tune, _sample_points(tune)[0], tmp_path, tmp_path, pruning=pruning)["trainer"]["callbacks"]
    (cb,) = [c for c in cbs if c["class_path"] == "ablations.pruning.StudyPruning"]
    assert cb["init_args"] == {**pruning, "monitor": "val/acc_sampled", "pruner": DEFAULT_PRUNER}
    cbs = obj.trial_overlay(grid, grid.points()[0], tmp_path, tmp_path, pruning=pruning)["trainer"]["callbacks"]
    assert not [c for c in cbs if "pruning" in c["class_path"]]


@pytest.mark.slow
def test_a_pruned_trial_stops_its_fit_early_and_keeps_its_curves(tmp_path, monkeypatch):
    """A real fit with the callback from the overlay: a pruner that prunes everything stops it at the first
    validation (step 8 of 16), and the objective records the curves and raises TrialPruned."""
    monkeypatch.chdir(tmp_path)
    space = Space(name="prune", description="prune", base_config="configs/ablate_smoke.yaml", probe=None, n_trials=1,
                  distributions={"model.clip_high": optuna.distributions.FloatDistribution(0.2, 0.3)},
                  pruner={"class_path": "optuna.pruners.ThresholdPruner", "init_args": {"lower": 2.0}})
    url = f"sqlite:///{tmp_path / 'prune.db'}"
    study = optuna.create_study(study_name="prune", storage=make_storage(url), direction="maximize",
                                pruner=make_pruner(space.pruner))
    objective = obj.Objective(space, tmp_path / "study", tmp_path, probe=False, storage_url=url)
    study.optimize(objective, n_trials=1)
    (t,) = study.get_trials()
    assert t.state == TrialState.PRUNED, (tmp_path / "study" / "0" / "fit.log").read_text()[-2000:]
    assert list(t.intermediate_values) == [8] and t.user_attrs["last_step"] == 7  # 8 optimizer steps (logged 0..7)
    assert "train/reward" in t.user_attrs["curves"]


# ---- duplicates and the study loop --------------------------------------------------------------------
def _trial(state, params, number_start, value=None, grid=None):
    dists = {k: CategoricalDistribution((grid or {}).get(k, [v])) for k, v in params.items()}
    t = create_trial(state=state, params=params, distributions=dists, value=value)
    t.datetime_start = datetime.datetime(2024, 1, 1) + datetime.timedelta(seconds=number_start)
    return t


def test_find_duplicate_prefers_complete_then_the_earlier_running_trial():
    p, q = {"model.advantage": "rloo", "seed": 0}, {"model.advantage": "reward", "seed": 0}
    trials = [_trial(TrialState.COMPLETE, q, 0, 1.0), _trial(TrialState.RUNNING, p, 5), _trial(TrialState.FAIL, p, 1)]
    for i, t in enumerate(trials):
        t.number = i
    start = lambda s: datetime.datetime(2024, 1, 1) + datetime.timedelta(seconds=s)  # noqa: E731
    assert obj.find_duplicate(trials, 9, q, start(9)).number == 0  # a COMPLETE one always wins
    assert obj.find_duplicate(trials, 9, p, start(9)).number == 1  # an earlier RUNNING one wins
    assert obj.find_duplicate(trials, 0, p, start(2)) is None  # a later RUNNING one does not; FAIL never does
    assert obj.find_duplicate(trials, 1, p, start(5)) is None  # not a duplicate of itself


def _fake_objective(space, fail_first=(), always_fail=(), sleep=0.0):
    """An objective without a fit: checks duplicates like the real one; fails some points on purpose."""
    seen: dict[tuple, int] = {}

    def objective(trial):
        params = space.suggest(trial)
        obj.check_duplicate(trial, params)
        key = tuple(sorted(params.items()))
        seen[key] = seen.get(key, 0) + 1
        time.sleep(sleep)
        if key in always_fail or (key in fail_first and seen[key] == 1):
            raise obj.FitFailed("on purpose")
        trial.set_user_attr("pid", os.getpid())
        return 1.0

    return objective


def _key(**params):
    return tuple(sorted(params.items()))


def test_run_grid_retries_failed_points_and_counts_each_point_once(tmp_path):
    space = Space(name="t", description="t", grid={"model.advantage": ["reward", "rloo"], "seed": [0, 1]}, probe=None)
    study = open_study(space, "t", make_storage(f"sqlite:///{tmp_path / 't.db'}"))
    flaky, broken = _key(**{"model.advantage": "rloo", "seed": 0}), _key(**{"model.advantage": "reward", "seed": 1})
    out = run_grid(study, space, _fake_objective(space, fail_first=[flaky], always_fail=[broken]), n_jobs=1, max_failures=2)
    status = point_status(study.get_trials(), space.points())
    assert status[flaky]["COMPLETE"] == 1 and status[flaky]["FAIL"] == 1  # failed once, retried, done
    assert status[broken]["COMPLETE"] == 0 and status[broken]["FAIL"] == 2  # bounded: gave up after 2
    assert out["gave_up"] == [{"model.advantage": "reward", "seed": 1}]
    assert all(c["COMPLETE"] == 1 for k, c in status.items() if k != broken)
    # Resuming runs nothing new: every point is COMPLETE or has used up its failures.
    n = len(study.get_trials())
    run_grid(study, space, _fake_objective(space), n_jobs=1, max_failures=2)
    assert len(study.get_trials()) == n


def test_a_duplicate_trial_is_pruned_before_any_fit(tmp_path):
    space = SPACES["smoke"]
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'd.db'}", direction="maximize")
    params = {"model.advantage": "reward", "seed": 0}
    study.add_trial(_trial(TrialState.COMPLETE, params, 0, 0.5, grid=space.grid))
    study.enqueue_trial(params)
    objective = obj.Objective(space, tmp_path / "study", tmp_path)
    study.optimize(objective, n_trials=1)
    t = study.trials[-1]
    assert t.state == TrialState.PRUNED and t.user_attrs["duplicate_of"] == 0
    assert not (tmp_path / "study").exists()  # no fit was started


# ---- the report --------------------------------------------------------------------------------------
def _synthetic_study(storage: str, seeds=(0, 1, 2)) -> optuna.Study:
    """COMPLETE trials as the objective writes them: rloo learns faster and has a higher SNR than reward."""
    space = SPACES["default"]
    study = optuna.create_study(study_name="synthetic", storage=storage, direction="maximize")
    study.set_user_attr("space", space.describe())
    rng = np.random.default_rng(0)
    for est, slope in [("reward", 0.0005), ("rloo", 0.0010), ("group_norm", 0.0009)]:
        for seed in seeds:
            steps = np.arange(100)
            reward = 0.3 + slope * steps + rng.normal(0, 0.02, len(steps))
            curves = {"train/reward": [[int(s), float(v)] for s, v in zip(steps, reward, strict=True)]}
            for d, off in [("easy", 0.2), ("hard", -0.2)]:
                curves[f"train/reward_{d}"] = [[s, v + off] for s, v in curves["train/reward"]]
                curves[f"val/acc_sampled_{d}"] = [[49, 0.3 + off + 20 * slope], [99, 0.3 + off + 50 * slope]]
            snrs = {"reward": 0.1, "rloo": 0.3, "group_norm": 0.25}  # every trial probes every estimator
            probe = [{"step": int(f * 100), "fraction": f, "estimator": e, "snr": v * (1 + 0.1 * seed), "cosine": 0.9,
                      "variance": 1.0, "signal": v, "relative_variance": 1 / v, "mean_norm": 1.0}
                     for f in (0.0, 0.5, 1.0) for e, v in snrs.items()]
            params = {"model.advantage": est, "seed": seed}
            attrs = {"curves": curves, "probe": probe, "auc": float(reward.mean()), "wall_time_s": 60.0 + seed,
                     "steps_to_threshold": 50 if slope > 0.0008 else None, "last_step": 99,
                     "final": {"sampled": 0.3 + 50 * slope, "sampled_easy": 0.5, "sampled_hard": 0.1, "greedy": 0.4},
                     "command": "python -m grpo_lab.cli fit ...", "logdir": f"runs/ablate/synthetic/{seed}"}
            dists = {"model.advantage": CategoricalDistribution(["reward", "mean_baseline", "group_norm", "rloo"]),
                     "seed": CategoricalDistribution([0, 1, 2])}
            study.add_trial(create_trial(state=TrialState.COMPLETE, params=params, distributions=dists,
                                         value=attrs["auc"], user_attrs=attrs))
    return study


def test_report_from_a_synthetic_study(tmp_path):
    study = _synthetic_study(f"sqlite:///{tmp_path / 's.db'}")
    path = write_report(study, tmp_path / "out")
    text = path.read_text()
    assert "| group | seeds |" in text and "| **rloo** | 3 |" in text and "| **reward** | 3 |" in text
    assert "## Paired differences against `reward`" in text and "## Verdict" in text
    # rloo's SNR is 3x reward's on every seed: the paired CI excludes 0, and the verdict says so.
    assert "2 of 2 beat reward on gradient SNR with a CI excluding 0" in text and "×3.00 of reward's" in text
    assert "same policies" in text
    assert "REINFORCE" in text and "unbiased" in text
    assert "≥ 100 ± 0 (0/3 reached)" in text  # reward never reached the threshold: censored at its length
    for png in ("reward_curves.png", "easy_hard.png", "probe.png"):
        img = (tmp_path / "out" / png)
        assert img.stat().st_size > 20_000, png
        h, w = __import__("matplotlib.image").image.imread(img).shape[:2]
        assert h >= 400 and w >= 700


def test_report_with_one_seed_says_na(tmp_path):
    study = _synthetic_study(f"sqlite:///{tmp_path / 's.db'}", seeds=(0,))
    text = write_report(study, tmp_path / "out").read_text()
    assert "(CI n/a)" in text and (tmp_path / "out" / "reward_curves.png").is_file()


def test_report_of_a_space_without_probe_compares_to_its_baseline(tmp_path):
    space = SPACES["objectives"]
    study = optuna.create_study(study_name="obj", storage=f"sqlite:///{tmp_path / 'o.db'}", direction="maximize")
    study.set_user_attr("space", space.describe())
    dists = {k: CategoricalDistribution(v) for k, v in space.grid.items()}
    for variant, auc in [("grpo", 0.30), ("constant", 0.35)]:
        for seed in (0, 1):
            curves = {"train/reward": [[s, auc] for s in range(10)]}
            study.add_trial(create_trial(state=TrialState.COMPLETE, params={"variant": variant, "seed": seed},
                                         distributions=dists, value=auc,
                                         user_attrs={"curves": curves, "auc": auc + 0.01 * seed, "final": {}}))
    text = write_report(study, tmp_path / "out").read_text()
    assert "## Paired differences against `grpo`" in text and "| **constant** | 2 | +0.050" in text
    assert "SNR" not in text.split("## Paired")[0] and not (tmp_path / "out" / "probe.png").exists()


def test_report_of_an_empty_study(tmp_path):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'e.db'}")
    assert "nothing to report" in write_report(study, tmp_path / "out").read_text()


# ---- slow: whole studies -----------------------------------------------------------------------------
def _runner(root: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "ablations.run", "--space", "smoke", "--root", str(root), "--n-jobs", "2", *extra]


def _complete_by_point(db: Path) -> dict[tuple, list[int]]:
    study = optuna.load_study(study_name="smoke", storage=f"sqlite:///{db}")
    out: dict[tuple, list[int]] = {}
    for t in study.get_trials(states=(TrialState.COMPLETE,)):
        out.setdefault(tuple(sorted(t.params.items())), []).append(t.number)
    return out


@pytest.mark.slow
def test_smoke_study_end_to_end(tmp_path):
    """``grpo-lab-ablate --space smoke`` from another directory: one COMPLETE trial per point and a report."""
    subprocess.run(_runner(tmp_path / "runs"), cwd=tmp_path, check=True, capture_output=True, timeout=600)
    done = _complete_by_point(tmp_path / "runs" / "ablate" / "smoke.db")
    assert len(done) == len(SPACES["smoke"].points()) and all(len(v) == 1 for v in done.values())
    study = optuna.load_study(study_name="smoke", storage=f"sqlite:///{tmp_path / 'runs/ablate/smoke.db'}")
    t = study.get_trials(states=(TrialState.COMPLETE,))[0]
    assert {"curves", "probe", "wall_time_s", "steps_to_threshold", "auc", "final", "command", "logdir"} <= set(t.user_attrs)
    assert "train/reward" in t.user_attrs["curves"] and "val/acc_sampled_easy" in t.user_attrs["curves"]
    assert t.user_attrs["probe"] and {"snr", "cosine", "relative_variance"} <= set(t.user_attrs["probe"][0])
    out = tmp_path / "runs" / "ablate" / "smoke"
    assert (out / "report.md").is_file() and (out / "probe.png").is_file()
    trial_dir = Path(t.user_attrs["logdir"])  # runs/ablate/smoke/advantage=.../seed=.../trial_N
    assert trial_dir.relative_to(out).parts[-1] == f"trial_{t.number}"
    assert (trial_dir / "trial.yaml").is_file() and (trial_dir / "fit.log").is_file()
    assert "hp_metric" not in read_scalars(trial_dir)  # Lightning's constant -1 is off
    _, rows = hparams_table(out)  # TensorBoard's HParams tab: one row per trial, named by its params
    assert sorted(g["name"] for g in rows) == sorted(run_name(SPACES["smoke"], p) for p in SPACES["smoke"].points())


def _trial_log(root: Path, number: int) -> Path:
    """fit.log of trial ``number`` of the smoke study (its directory is named by its params)."""
    return next((root / "ablate" / "smoke").rglob(f"trial_{number}/fit.log"))


def _fits_of(root: Path, sub: str = "") -> list[int]:
    """Pids of live processes whose command line mentions ``root`` (the runner's fits; ``sub`` = "fit" leaves
    out the warm-start build)."""
    pids = []
    for d in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            cmd = Path(d).read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(root) in cmd and f"grpo_lab.cli {sub}" in cmd:
            pids.append(int(d.split("/")[2]))
    return pids


@pytest.mark.slow
def test_resume_after_sigkill_reruns_only_what_is_missing(tmp_path):
    root = tmp_path / "runs"
    db = root / "ablate" / "smoke.db"
    proc = subprocess.Popen(_runner(root, "--grace-period", "3", "--no-report"), cwd=tmp_path, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        first: dict[tuple, list[int]] = {}
        while time.time() < deadline and not first:
            time.sleep(0.3)
            if db.is_file():
                try:
                    first = _complete_by_point(db)
                except (KeyError, sqlite3.OperationalError, Exception):  # study not created yet
                    first = {}
        assert first, "no trial completed in time"
        assert len(first) < len(SPACES["smoke"].points()), "everything finished before the kill: nothing to resume"
        os.kill(proc.pid, signal.SIGKILL)  # the runner only: PR_SET_PDEATHSIG must take its fits down
        proc.wait()
        for _ in range(100):
            if not _fits_of(root):
                break
            time.sleep(0.2)
        assert not _fits_of(root), "orphaned fits survived the runner"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    done_numbers = sorted(n for v in first.values() for n in v)
    stamps = {n: _trial_log(root, n).stat().st_mtime_ns for n in done_numbers}
    rerun = subprocess.run(_runner(root, "--grace-period", "3"), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, f"the rerun failed:\n{rerun.stdout[-4000:]}\n{rerun.stderr[-4000:]}"
    done = _complete_by_point(db)
    assert len(done) == len(SPACES["smoke"].points()) and all(len(v) == 1 for v in done.values())
    for key, numbers in first.items():
        assert done[key] == numbers  # the finished trials were kept, not rerun
    assert stamps == {n: _trial_log(root, n).stat().st_mtime_ns for n in done_numbers}
    assert (root / "ablate" / "smoke" / "report.md").is_file()


@pytest.mark.slow
def test_a_killed_trial_fit_is_retried_and_counted_once(tmp_path):
    """SIGKILL of one trial's fit process (a worker dying mid-trial): that trial fails, its grid point is run
    again, and the study still ends with exactly one COMPLETE trial per point."""
    root = tmp_path / "runs"
    proc = subprocess.Popen(_runner(root, "--no-report"), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        victim = None
        deadline = time.time() + 300
        while victim is None and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
            fits = _fits_of(root, "fit")
            victim = fits[0] if fits else None
        assert victim is not None, "no fit started"
        time.sleep(1.0)  # let it get going
        os.kill(victim, signal.SIGKILL)
        assert proc.wait(timeout=600) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    db = root / "ablate" / "smoke.db"
    done = _complete_by_point(db)
    assert len(done) == len(SPACES["smoke"].points()) and all(len(v) == 1 for v in done.values())
    study = optuna.load_study(study_name="smoke", storage=f"sqlite:///{db}")
    assert any(t.state == TrialState.FAIL for t in study.get_trials()), "the killed trial should be recorded as failed"


# ---- PostgreSQL: many workers, one study ---------------------------------------------------------------
def _pg_worker(url: str, study_name: str) -> None:
    """One runner process without fits (see the PostgreSQL test)."""
    space = Space(name="pg", description="pg", grid={"model.advantage": ["reward", "rloo"], "seed": [0, 1, 2]}, probe=None)
    study = open_study(space, study_name, make_storage(url, grace_period=10))
    run_grid(study, space, _fake_objective(space, sleep=2.0), n_jobs=1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _postgres_server():
    """A throwaway PostgreSQL server on a free port (skips the test when the server binaries are absent)."""
    initdb = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not initdb:
        pytest.skip("PostgreSQL server binaries not installed (apt-get install postgresql)")
    pytest.importorskip("psycopg2")
    bindir = Path(initdb[-1]).parent
    as_root = os.geteuid() == 0
    if as_root and shutil.which("runuser") is None:
        pytest.skip("running as root without runuser: cannot start PostgreSQL as the postgres user")
    tmp = Path(tempfile.mkdtemp(prefix="grpo_pg_", dir="/tmp"))
    if as_root:
        shutil.chown(tmp, "postgres", "postgres")

    def pg(*cmd: str) -> subprocess.CompletedProcess:
        full = ["runuser", "-u", "postgres", "--", *cmd] if as_root else list(cmd)
        return subprocess.run(full, check=True, capture_output=True, text=True, timeout=120)

    port = _free_port()
    data = tmp / "data"
    started = False
    try:
        pg(str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust")
        pg(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(tmp / "log"), "-w", "-o",
           f"-p {port} -k {tmp} -h 127.0.0.1", "start")
        started = True
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        if started:
            pg(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(tmp, ignore_errors=True)


def _pg_workers(url: str, study_name: str, n: int) -> list[subprocess.Popen]:
    code = f"from tests.test_ablations import _pg_worker; _pg_worker({url!r}, {study_name!r})"
    return [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT) for _ in range(n)]


def _pg_done(url: str, study_name: str) -> tuple[optuna.Study, list]:
    study = optuna.load_study(study_name=study_name, storage=make_storage(url))
    return study, [t for t in study.get_trials() if t.state == TrialState.COMPLETE]


@pytest.mark.slow
def test_two_workers_share_a_postgresql_study():
    with _postgres_server() as url:
        assert [w.wait(timeout=300) for w in _pg_workers(url, "shared", 2)] == [0, 0]
        _, done = _pg_done(url, "shared")
        keys = [tuple(sorted(t.params.items())) for t in done]
        assert len(done) == 6 and len(set(keys)) == 6  # every point once, none twice
        assert len({t.user_attrs["pid"] for t in done}) == 2  # both workers landed trials


@pytest.mark.slow
def test_a_postgresql_study_resumes_after_its_worker_is_killed():
    """SIGKILL a worker mid-trial; a new worker waits for the dead one's heartbeat to go stale, reruns that
    point and completes the grid with exactly one COMPLETE trial per point."""
    with _postgres_server() as url:
        (victim,) = _pg_workers(url, "killed", 1)
        try:
            deadline = time.time() + 120
            while time.time() < deadline:
                time.sleep(0.5)
                try:
                    study, done = _pg_done(url, "killed")
                except KeyError:  # the study does not exist yet
                    continue
                if done and any(t.state == TrialState.RUNNING for t in study.get_trials()):
                    break
            assert done, "the first worker completed no trial"
            victim.kill()
            victim.wait(timeout=30)
        finally:
            victim.kill()
        assert [w.wait(timeout=300) for w in _pg_workers(url, "killed", 1)] == [0]
        study, done = _pg_done(url, "killed")
        keys = [tuple(sorted(t.params.items())) for t in done]
        assert len(done) == 6 and len(set(keys)) == 6
        assert any(t.state == TrialState.FAIL for t in study.get_trials()), "the killed trial should be FAIL"
        assert len({t.user_attrs["pid"] for t in done}) == 2  # the dead worker's trials were kept


def test_shipped_ablate_configs_exist():
    for name in ("ablate.yaml", "ablate_smoke.yaml"):
        assert (CONFIGS / name).is_file()
    assert json.dumps(SPACES["default"].describe())  # JSON-safe: it is stored on the study
