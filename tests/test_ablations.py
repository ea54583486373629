"""The ablation harness: spaces, the trial's config, pruning and the grid loop (resuming, duplicates and a
changed space: test_ablation_resume.py; the report: test_ablation_report.py; whole studies:
test_ablation_studies.py)."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import types
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState

from ablations.report import curves
from ablations.run import build_parser
from ablations.runner import duplicates
from ablations.runner import launch as fits
from ablations.runner.progress import point_status
from ablations.runner.pruning import DEFAULT_PRUNER, StudyPruning, make_pruner, pruned_at
from ablations.runner.storage import make_storage
from ablations.runner.study_loop import open_study, run_grid
from ablations.runner.trial import TrialRunner, nest, resolve_config, trial_overlay, write_overlay
from ablations.spaces.space import SPACES, ProbeSettings, Space, get_space, register_space
from grpo_lab.cli import cli_main
from grpo_lab.system.errors import UserError
from tests.conftest import CONFIGS, frozen_trial

optuna.logging.set_verbosity(optuna.logging.WARNING)


# ---- spaces ------------------------------------------------------------------------------------------
def _sample_points(space: Space) -> list[dict]:
    """One point per group (seed 0 only) of a grid space, or the distributions' lower ends."""
    if space.is_grid:
        return [p for p in space.points() if p.get("seed", 0) == space.grid.get("seed", [0])[0]]
    return [{k: getattr(d, "low", None) if hasattr(d, "low") else d.choices[0]
             for k, d in space.distributions.items()}]


@pytest.mark.parametrize("name", sorted(SPACES))
def test_every_space_builds_overlays_that_grpo_lab_loads(name, tmp_path):
    space = SPACES[name]
    for i, params in enumerate(_sample_points(space)):
        trial_dir = tmp_path / str(i)
        overlay = write_overlay(trial_overlay(space, params, trial_dir, tmp_path),
                                    trial_dir / "trial.yaml")
        cli = cli_main(["--config", resolve_config(space.base_config), "--config", str(overlay)],
                       run=False)
        for key, value in space.trial_overrides(params).items():  # every key is a real config key, and set
            assert cli.config[key] == value, (name, params, key)
        assert Path(cli.trainer.log_dir).resolve() == trial_dir.resolve()
        assert not cli.trainer.checkpoint_callbacks and not cli.trainer.progress_bar_callback
        probes = [c for c in cli.trainer.callbacks if type(c).__name__ == "GradientVarianceProbe"]
        assert len(probes) == space.probes(params)


def test_seed_sets_the_rl_seed_the_data_order_and_the_probe():
    space = SPACES["default"]
    over = space.trial_overrides({"model.advantage": "rloo", "seed": 2})
    assert over == {"trainer.max_steps": 130, "model.advantage": "rloo", "seed_everything": 2, "data.seed": 2,
                    "model.warm_start.seed": 1236}  # population "networks": each seed its own warm start
    cb = ProbeSettings().callback("rloo", 2)
    assert cb["class_path"] == "grpo_lab.variance.GradientVarianceProbe" and cb["init_args"]["seed"] == 2
    assert ProbeSettings(estimators="own").callback("rloo", 0)["init_args"]["estimators"] == ["rloo"]
    assert len(space.points()) == 32  # 3 estimators and an A/A arm x 8 seeds (issue 10: at least 6 per arm)
    assert SPACES["strategies"].trial_overrides({"strategy": "ddp2"})["trainer.devices"] == 2
    # prompts_per_step is global: every strategy sees the same batch (the base config's)
    assert all("data.prompts_per_step" not in SPACES["strategies"].trial_overrides({"strategy": s, "seed": 0})
               for s in ("single", "ddp1", "ddp2"))


def test_the_default_aa_arm_shares_the_seeds_network_and_trains_without_the_probe(tmp_path):
    space = SPACES["default"]
    a = space.trial_overrides({"model.advantage": "rloo", "seed": 3})
    b = space.trial_overrides({"model.advantage": "rloo (A/A)", "seed": 3})
    assert (b["seed_everything"], b["data.seed"], b["model.advantage"]) == (1003, 1003, "rloo")
    assert a["model.warm_start.seed"] == b["model.warm_start.seed"] == 1237  # the seed's own network
    assert "probe" not in b and "seed_offset" not in b
    assert space.probes({"model.advantage": "rloo", "seed": 3})
    assert not space.probes({"model.advantage": "rloo (A/A)", "seed": 3})
    cfg = trial_overlay(space, {"model.advantage": "rloo (A/A)", "seed": 3}, tmp_path / "t", tmp_path)
    assert cfg["trainer"]["callbacks"] == []
    one = Space(name="one", description="one", grid={"model.advantage": ["rloo"], "seed": [0, 1]},
                population="one_network")
    assert "model.warm_start.seed" not in one.trial_overrides({"model.advantage": "rloo", "seed": 1})
    with pytest.raises(UserError, match="population must be one of"):
        Space(name="bad", description="b", grid={"seed": [0]}, population="everyone")


def test_controls_offset_the_seed_stream_of_the_aa_arm_and_the_probe_follows(tmp_path):
    space = SPACES["controls"]
    a = space.trial_overrides({"arm": "rloo+3", "seed": 2})
    b = space.trial_overrides({"arm": "rloo+3 (seeds+1000)", "seed": 2})
    assert (a["seed_everything"], a["data.seed"], b["seed_everything"], b["data.seed"]) == (2, 2, 1002, 1002)
    assert a["model.advantage"] == b["model.advantage"] == "rloo" and "seed_offset" not in b
    assert a["model.reward_weights"] == [1.0, 3.0]
    assert a["model.rewards"][1] == "ablations.spaces.controls:constant"
    cfg = trial_overlay(space, {"arm": "rloo+3 (seeds+1000)", "seed": 2}, tmp_path / "t", tmp_path)
    (probe,) = cfg["trainer"]["callbacks"]
    assert probe["init_args"]["seed"] == 1002
    assert probe["init_args"]["cache_dir"] == str(tmp_path / "probe_cache")
    kinds = [c["kind"] for c in space.describe()["comparisons"]]
    assert kinds == ["positive_control", "aa_control"]
    assert space.points_for([7]) == [{"arm": arm, "seed": 7} for arm in space.grid["arm"]]
    # group by group: side-by-side trials get other seeds (no wait on one seed's warm-start probe point)
    pts = space.points_for([7, 8])
    assert [p["seed"] for p in pts[:4]] == [7, 8, 7, 8] and pts[0]["arm"] == pts[1]["arm"] != pts[2]["arm"]


def test_seed_is_an_int_parameter_and_old_categorical_studies_still_resume(tmp_path):
    space = Space(name="s", description="s", grid={"model.advantage": ["reward"], "seed": [0, 1]}, probe=None)
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'a.db'}")
    study.enqueue_trial({"model.advantage": "reward", "seed": 5})  # a seed outside the grid: a later round
    trial = study.ask()
    assert space.suggest(trial) == {"model.advantage": "reward", "seed": 5}
    assert isinstance(trial.distributions["seed"], optuna.distributions.IntDistribution)
    old = optuna.create_study(storage=f"sqlite:///{tmp_path / 'b.db'}")
    old.add_trial(frozen_trial(TrialState.COMPLETE, {"model.advantage": "reward", "seed": 0}, 0, 1.0,
                         grid=space.grid))
    old.enqueue_trial({"model.advantage": "reward", "seed": 1})
    trial = old.ask()
    assert space.suggest(trial)["seed"] == 1
    assert isinstance(trial.distributions["seed"], CategoricalDistribution)


def test_space_registry_errors_and_import_paths(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="known: .*default"):
        get_space("nope")
    with pytest.raises(ValueError, match="exactly one of grid"):
        Space(name="x", description="", grid=None)
    with pytest.raises(ValueError, match="have no preset"):
        Space(name="x", description="", grid={"v": ["a", "b"]}, presets={"v": {"a": {}}})
    (tmp_path / "my_spaces.py").write_text(
        "from ablations.spaces.space import Space\n"
        "temp = Space(name='temp_test', description='t', "
        "grid={'model.temperature': [0.7, 1.0], 'seed': [0]})\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    space = get_space("my_spaces:temp")
    assert space.name == "temp_test" and SPACES.pop("temp_test") is space


def test_a_space_name_is_registered_once():
    """Another space named ``default`` raises (naming the registry and the name) and the built-in stays; the
    same space again, or an equal one (a reloaded module re-creates it), is no clash."""
    default = SPACES["default"]
    with pytest.raises(ValueError, match="^space 'default' is already registered: register the new space "):
        register_space(Space(name="default", description="mine", grid={"seed": [0]}))
    assert SPACES["default"] is default
    assert register_space(default) is default
    equal = dataclasses.replace(default)
    assert equal is not default and register_space(equal) is equal
    register_space(default)
    assert SPACES["default"] is default


def test_every_runner_flag_has_help():
    parser = build_parser()
    flags = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    dests = {"space", "study", "storage", "n_jobs", "no_report", "report_only", "root"}
    assert dests <= {a.dest for a in flags}
    assert all(a.help and len(a.help) > 10 for a in flags)


# ---- the trial's config ------------------------------------------------------------------------------
def test_curve_metrics_by_hand():
    line = [(s, s / 10) for s in range(11)]  # 0 -> 1 over 10 steps
    assert curves.auc(line) == pytest.approx(0.5) and curves.auc([(3, 0.2)]) == 0.2
    assert curves.steps_to_threshold(line, 0.5, window=3) == 6  # mean of steps 4, 5, 6 = 0.5
    # a lucky start is not enough
    assert curves.steps_to_threshold([(0, 1.0), (1, 0.0), (2, 0.0)], 0.9, window=3) is None
    long = [(s, float(s % 2)) for s in range(1000)]
    small = curves.downsample(long)
    assert len(small) == 200 and np.mean([v for _, v in small]) == pytest.approx(0.5)
    assert nest({"model.advantage": "rloo", "model.policy.hidden_size": 8}) == {
        "model": {"advantage": "rloo", "policy": {"hidden_size": 8}}}


def test_run_fit_raises_with_the_log_tail(tmp_path):
    with pytest.raises(fits.FitFailed, match="(?s)exited with 3.*boom"):
        fits.run_fit([sys.executable, "-c", "print('boom'); raise SystemExit(3)"], tmp_path / "a.log",
                    threads=1)


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
    overlay = trial_overlay(tune, _sample_points(tune)[0], tmp_path, tmp_path, pruning=pruning)
    cbs = overlay["trainer"]["callbacks"]
    (cb,) = [c for c in cbs if c["class_path"] == "ablations.runner.pruning.StudyPruning"]
    assert cb["init_args"] == {**pruning, "monitor": "val/acc_sampled", "pruner": DEFAULT_PRUNER}
    overlay = trial_overlay(grid, grid.points()[0], tmp_path, tmp_path, pruning=pruning)
    cbs = overlay["trainer"]["callbacks"]
    assert not [c for c in cbs if "pruning" in c["class_path"]]


@pytest.mark.slow
def test_a_pruned_trial_stops_its_fit_early_and_keeps_its_curves(tmp_path, monkeypatch):
    """A real fit with the callback from the overlay: a pruner that prunes everything stops it at the first
    validation (step 8 of 16), and the trial runner records the curves and raises TrialPruned."""
    monkeypatch.chdir(tmp_path)
    space = Space(name="prune", description="prune", base_config="configs/ablate_smoke.yaml", probe=None,
                  n_trials=1,
                  distributions={"model.clip_high": optuna.distributions.FloatDistribution(0.2, 0.3)},
                  pruner={"class_path": "optuna.pruners.ThresholdPruner", "init_args": {"lower": 2.0}})
    url = f"sqlite:///{tmp_path / 'prune.db'}"
    study = optuna.create_study(study_name="prune", storage=make_storage(url), direction="maximize",
                                pruner=make_pruner(space.pruner))
    trial_runner = TrialRunner(space, tmp_path / "study", tmp_path, probe=False, storage_url=url)
    study.optimize(trial_runner, n_trials=1)
    (t,) = study.get_trials()
    assert t.state == TrialState.PRUNED, (tmp_path / "study" / "0" / "fit.log").read_text()[-2000:]
    # 8 optimizer steps (logged 0..7)
    assert list(t.intermediate_values) == [8] and t.user_attrs["last_step"] == 7
    assert "train/reward" in t.user_attrs["curves"]


# ---- the study loop ---------------------------------------------------------------------------------
def _fake_trial_runner(space, fail_first=(), always_fail=(), sleep=0.0):
    """A trial runner without a fit: checks duplicates like the real one; fails some points on purpose."""
    seen: dict[tuple, int] = {}

    def run_trial(trial):
        params = space.suggest(trial)
        duplicates.check_duplicate(trial, params)
        key = tuple(sorted(params.items()))
        seen[key] = seen.get(key, 0) + 1
        time.sleep(sleep)
        if key in always_fail or (key in fail_first and seen[key] == 1):
            raise fits.FitFailed("on purpose")
        trial.set_user_attr("pid", os.getpid())
        return 1.0

    return run_trial


def _key(**params):
    return tuple(sorted(params.items()))


def test_run_grid_retries_failed_points_and_counts_each_point_once(tmp_path):
    space = Space(name="t", description="t", grid={"model.advantage": ["reward", "rloo"], "seed": [0, 1]},
                  probe=None)
    study = open_study(space, "t", make_storage(f"sqlite:///{tmp_path / 't.db'}"))
    flaky = _key(**{"model.advantage": "rloo", "seed": 0})
    broken = _key(**{"model.advantage": "reward", "seed": 1})
    out = run_grid(study, space, _fake_trial_runner(space, fail_first=[flaky], always_fail=[broken]),
                   n_jobs=1, max_failures=2)
    status = point_status(study.get_trials(), space.points())
    assert status[flaky]["COMPLETE"] == 1 and status[flaky]["FAIL"] == 1  # failed once, retried, done
    assert status[broken]["COMPLETE"] == 0 and status[broken]["FAIL"] == 2  # bounded: gave up after 2
    assert out["gave_up"] == [{"model.advantage": "reward", "seed": 1}]
    assert all(c["COMPLETE"] == 1 for k, c in status.items() if k != broken)
    # Resuming runs nothing new: every point is COMPLETE or has used up its failures.
    n = len(study.get_trials())
    run_grid(study, space, _fake_trial_runner(space), n_jobs=1, max_failures=2)
    assert len(study.get_trials()) == n


def _effect_trial_runner(space, effects, sd=0.02, wall=10.0):
    """A fit-free trial runner whose AUC is 0.5 + effects[advantage] + a seeded N(0, sd) per (group, seed)."""
    def run_trial(trial):
        params = space.suggest(trial)
        duplicates.check_duplicate(trial, params)
        rng = np.random.default_rng([params["seed"], sorted(effects).index(params["model.advantage"])])
        trial.set_user_attr("auc", 0.5 + effects[params["model.advantage"]] + float(rng.normal(0, sd)))
        trial.set_user_attr("wall_time_s", wall)
        return 0.0

    return run_trial


def test_until_decisive_runs_steins_planned_seeds_and_resumes(tmp_path):
    from ablations.report.summary import DEFAULT_MIN_EFFECT, build_summary
    from ablations.runner.sequential import parse_duration, run_until_decisive

    durations = [parse_duration(text) for text in ("20m", "90s", "1.5h", "7")]
    assert durations == [1200, 90, 5400, 7]
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration("soon")
    space = Space(name="d", description="d", probe=None,
                  grid={"model.advantage": ["reward", "rloo"], "seed": [2, 3, 4, 5]})
    storage = make_storage(f"sqlite:///{tmp_path / 'd.db'}")
    study = open_study(space, "d", storage)
    trial_runner = _effect_trial_runner(space, {"reward": 0.0, "rloo": 0.05}, sd=0.008)
    out = run_until_decisive(study, space, trial_runner, 1, 3600, DEFAULT_MIN_EFFECT, round_seeds=2,
                             say=lambda m: None, storage=storage)
    assert out["reason"] == "every comparison has its planned seeds" and out["open"] == []
    # Stein: seeds 2-5 (the grid: t with 3 df) plan the rest from their spread; the report tests with their SD
    rloo = build_summary(study)["comparisons"]["rloo"]
    assert rloo["auc_diff"]["stein"] and rloo["auc_diff"]["df"] == 3
    n = len(out["seeds"])
    assert rloo["seeds_planned"] > 4 and n >= rloo["seeds_planned"] > n - 2  # the last round was needed
    status = point_status(study.get_trials(), space.points_for(out["seeds"]))
    assert all(c["COMPLETE"] == 1 for c in status.values())
    n = len(study.get_trials())
    again = run_until_decisive(study, space, trial_runner, 1, 3600, DEFAULT_MIN_EFFECT, say=lambda m: None,
                               storage=storage)
    assert again["seeds"] == out["seeds"] and len(study.get_trials()) == n  # resumed: nothing new to run
    # No effect, large noise, 2 threads (enqueued trials claimed at once: SerialPopRDBStorage), and a budget
    # below the next round's cost (2 groups x 2 seeds x 60 s / 2 workers): stops for the budget, says so.
    null = open_study(space, "null", storage)
    out = run_until_decisive(null, space,
                             _effect_trial_runner(space, {"reward": 0.0, "rloo": 0.0}, sd=0.2, wall=60.0),
                             2, 100, DEFAULT_MIN_EFFECT, say=lambda m: None, storage=storage)
    assert out["reason"].startswith("budget") and out["open"] == ["rloo"] and out["seeds"] == [2, 3, 4, 5]


def test_shipped_ablate_configs_exist():
    for name in ("ablate.yaml", "ablate_smoke.yaml"):
        assert (CONFIGS / name).is_file()
    assert json.dumps(SPACES["default"].describe())  # JSON-safe: it is stored on the study
