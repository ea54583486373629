"""A study in TensorBoard: runs named by their params, one HParams row per finished trial, read back through
TensorBoard's own event reader and HParams plugin (the data its HParams tab shows)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
from tensorboard.plugins import base_plugin
from tensorboard.plugins.hparams import hparams_plugin
from werkzeug.test import Client
from werkzeug.wrappers import Response

from ablations.report import tensorboard_runs as tb
from ablations.runner.trial import trial_overlay
from ablations.spaces.space import SPACES, Space
from grpo_lab.train.tensorboard_scalars import read_scalars

STATUSES = ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"]


def hparams_table(logdir: Path) -> tuple[dict, list[dict]]:
    """What TensorBoard's HParams tab fetches for ``tensorboard --logdir logdir``: the experiment (columns)
    and the session groups (rows), from the plugin's own HTTP routes."""
    mux = plugin_event_multiplexer.EventMultiplexer()
    mux.AddRunsFromDirectory(str(logdir))
    mux.Reload()
    ctx = base_plugin.TBContext(logdir=str(logdir), multiplexer=mux,
                                data_provider=data_provider.MultiplexerDataProvider(mux, str(logdir)))
    apps = hparams_plugin.HParamsPlugin(ctx).get_plugin_apps()

    def post(route: str, body: dict) -> dict:
        res = Client(apps[route], Response).post(route, data=json.dumps(body),
                                                 content_type="application/json")
        assert res.status_code == 200, res.get_data(as_text=True)
        return json.loads(res.get_data())

    experiment = post("/experiment", {})
    groups = post("/session_groups",
                  {"startIndex": 0, "sliceSize": 1000, "allowedStatuses": STATUSES, "colParams": []})
    return experiment, groups.get("sessionGroups", [])


# ---- names ----------------------------------------------------------------------------------------------
def test_run_names_are_the_params_in_the_spaces_order():
    assert tb.run_name(SPACES["default"], {"seed": 2, "model.advantage": "rloo"}) == "advantage=rloo/seed=2"
    assert tb.run_name(SPACES["strategies"], {"seed": 0, "strategy": "ddp2"}) == "strategy=ddp2/seed=0"
    tune = {"model.optimizer.init_args.lr": 0.000163412, "model.clip_high": 0.25}
    assert tb.run_name(SPACES["tune_lr"], tune) == "lr=0.0001634/clip_high=0.25"
    assert tb.trial_dir(Path("s"), SPACES["default"], {"model.advantage": "reward", "seed": 0}, 7) == \
        Path("s/advantage=reward/seed=0/trial_7")


def test_short_names_keep_the_full_key_on_a_clash_and_values_are_path_safe():
    assert tb.short_names(["model.beta", "ref.beta", "seed"]) == {"model.beta": "model.beta",
                                                                  "ref.beta": "ref.beta",
                                                                   "seed": "seed"}
    space = Space(name="t", description="", grid={"model.rewards": [["a/b c"]], "seed": [0]})
    assert tb.run_name(space, {"model.rewards": ["a/b c"], "seed": 0}) == "rewards=_a_b_c_/seed=0"


# ---- metrics --------------------------------------------------------------------------------------------
PROBE = [{"estimator": "rloo", "fraction": 0.0, "snr": 0.2},
         {"estimator": "rloo", "fraction": 1.0, "snr": 0.4},
         {"estimator": "reward", "fraction": 0.0, "snr": 9.0},
         {"estimator": "rloo", "fraction": 0.5, "snr": math.nan}]


def test_own_snr_is_the_mean_of_its_own_estimators_finite_rows():
    assert tb.own_snr(PROBE, "rloo") == pytest.approx(0.3)
    assert tb.own_snr(PROBE, "group_norm") is None  # several estimators probed, not this one
    assert tb.own_snr([{"estimator": "group_norm", "snr": 0.5}], None) == 0.5  # only one probed: it
    assert tb.own_snr([], "rloo") is None


def test_final_metrics_leave_out_what_is_undefined():
    attrs = {"auc": 0.31, "final": {"sampled": 0.5, "sampled_easy": 0.75, "greedy": 0.6}, "probe": PROBE,
             "steps_to_threshold": None, "wall_time_s": 12.5}
    assert tb.final_metrics(attrs, "rloo") == {"study/auc": 0.31, "study/final_acc_sampled": 0.5,
                                               "study/final_acc_sampled_easy": 0.75,
                                               "study/snr": pytest.approx(0.3), "study/wall_time_s": 12.5}


def test_the_trial_logger_has_no_constant_hp_metric(tmp_path):
    cfg = trial_overlay(SPACES["smoke"], {"model.advantage": "rloo", "seed": 0}, tmp_path / "t", tmp_path)
    assert cfg["trainer"]["logger"]["init_args"]["default_hp_metric"] is False


# ---- written and read back -------------------------------------------------------------------------------
def _attrs(seed: int, estimator: str) -> dict:
    return {"auc": 0.3 + seed / 10,
            "final": {"sampled": 0.25 * seed, "sampled_easy": 0.5, "sampled_hard": 0.0},
            "probe": [{"estimator": estimator, "fraction": 0.0, "snr": 0.1 * (seed + 1)}],
            "steps_to_threshold": 8 if seed else None, "wall_time_s": 30.0 + seed, "last_step": 15}


def test_hparams_rows_read_back_through_tensorboard(tmp_path):
    space = SPACES["smoke"]
    written = {}
    for number, params in enumerate(space.points()):
        run_dir = tb.trial_dir(tmp_path, space, params, number)
        metrics = tb.write_hparams(run_dir, space, params, _attrs(params["seed"], params["model.advantage"]),
                                   probed=True, step=15)
        written[tb.run_name(space, params)] = (params, metrics, run_dir)
    # the scalars, with TensorBoard's event reader
    params, metrics, run_dir = written["advantage=rloo/seed=1"]
    assert {tag: pts for tag, pts in read_scalars(run_dir).items()} == {
        tag: [(15, pytest.approx(v))] for tag, v in metrics.items()}
    # None: no value
    assert "study/steps_to_threshold" not in read_scalars(written["advantage=rloo/seed=0"][2])
    # the HParams tab: one row per trial, named by its params, with its params and metrics
    experiment, groups = hparams_table(tmp_path)
    assert [h["name"] for h in experiment["hparamInfos"]] == ["advantage", "seed"]
    assert sorted(experiment["hparamInfos"][0]["domainDiscrete"]) == ["reward", "rloo"]
    assert [m["name"]["tag"] for m in experiment["metricInfos"]] == [tag for tag, _ in tb.METRICS]
    assert sorted(g["name"] for g in groups) == sorted(written)
    for g in groups:
        params, metrics, run_dir = written[g["name"]]
        assert [s["name"] for s in g["sessions"]] == [run_dir.relative_to(tmp_path).as_posix()]
        assert g["hparams"] == {"advantage": params["model.advantage"], "seed": params["seed"]}
        values = {m["name"]["tag"]: m["value"] for m in g["metricValues"] if "value" in m}
        assert values == {tag: pytest.approx(v) for tag, v in metrics.items()}


def test_a_tuning_space_gets_ranges_and_no_snr_column_without_probe(tmp_path):
    space = SPACES["tune_lr"]
    params = {"model.optimizer.init_args.lr": 3e-4, "model.clip_high": 0.3}
    tb.write_hparams(tb.trial_dir(tmp_path, space, params, 0), space, params,
                     {"auc": 0.2, "final": {"sampled": 0.1}, "steps_to_threshold": None, "wall_time_s": 3.0},
                     probed=False)
    experiment, groups = hparams_table(tmp_path)
    infos = {h["name"]: h for h in experiment["hparamInfos"]}
    assert infos["lr"]["domainInterval"] == {"minValue": 1e-4, "maxValue": 3e-3}
    assert "study/snr" not in [m["name"]["tag"] for m in experiment["metricInfos"]]
    assert [g["name"] for g in groups] == ["lr=0.0003/clip_high=0.3"]
