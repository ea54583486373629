"""One Optuna trial = one ``grpo-lab fit`` (in a long-lived worker, or its own process); its TensorBoard
scalars become the trial's metrics.

``TrialRunner`` is the callable ``study.optimize`` calls (Optuna names that callable its objective; here
"objective" means only the policy objective, ``model.objective``). For trial N of study S it

1. takes its params from the space (``GridSampler`` values, an enqueued point, or TPE samples);
2. gives up at once (``TrialPruned("duplicate of trial M")``) if another trial of the study already holds
   the same params: a COMPLETE one, or a RUNNING one that started earlier (its heartbeat still fresh, or
   it would have been failed by ``fail_stale_trials``). Ties are broken by (start time, number), so of two
   trials racing for one grid point exactly one goes on. The report therefore sees one COMPLETE trial per
   grid point, however often the study is resumed or however many workers share it;
3. writes ``runs/ablate/S/<params>/trial_N/trial.yaml`` (``<params>`` = ``advantage=rloo/seed=0``, see
   ``ablations/report/tensorboard_runs.py``): the space's overrides for these params, TensorBoard to that
   directory
   (without Lightning's constant ``hp_metric``), no progress bar or checkpoints, and as callbacks the
   gradient-variance probe and, last, ``ablations.runner.trial_timing.TrialTiming`` (``timing.json``: where
   the time went);
4. runs ``grpo-lab fit --config <space base config> --config .../trial_N/trial.yaml`` with its output in
   ``fit.log``: in a worker of the runner's ``WorkerPool`` (``ablations/runner/worker.py``: torch and
   Lightning are
   imported once per worker, not once per trial) when the trial is one process (``runs_in_process``), else
   as ``python -m grpo_lab.cli fit ...`` in a process of its own (a DDP trial, or ``--no-reuse``), with
   ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` set to the runner's threads per worker. Either way the command
   is stored as the trial's ``command`` user attr (to rerun by hand from the same directory), and, on
   Linux, ``PR_SET_PDEATHSIG`` (``grpo_lab.system.processes``) ties the worker or the fit, and every
   process it
   starts (a DDP trial's second rank), to the runner: a SIGKILLed runner leaves no orphans behind. A fit
   that fails, or a worker that dies during the trial, raises ``FitFailed`` (the trial fails and is retried);
5. reads the scalars back and returns the AUC of the reward curve (the mean ``train/reward`` over
   training: the normalised area under the curve, which rewards learning early as well as learning much);
   a COMPLETE trial also writes its params and final metrics as an HParams row into its TensorBoard run.

User attrs of a COMPLETE trial (what ``ablations/report/runs.py`` reads):

- ``curves``: ``{tag: [[step, value], ...]}`` for ``train/reward``, ``train/reward_easy``,
  ``train/reward_hard``, ``val/acc_sampled*`` and ``val/acc_greedy*``, at most 200 points each (bin means);
- ``probe``: the rows of ``probe.json`` (``{"step", "fraction", "estimator", "snr", "cosine", "variance",
  "signal", "relative_variance", "mean_norm", ...}``), empty without the probe;
- ``auc``, ``steps_to_threshold`` (first step at which the trailing moving average of ``train/reward``, over
  a full window, reaches the space's threshold; None if never) and ``last_step``;
- ``final``: the last value of every ``val/acc_*`` (``{"sampled": ..., "sampled_easy": ..., "greedy": ...}``);
- ``wall_time_s``, ``overrides`` (the trial's dotted config overrides), ``command``, ``cwd``, ``logdir``,
  ``in_process`` (run in a worker) and ``timing`` (seconds per phase, ``ablations/runner/trial_timing.py``).

Pruning (tuning spaces only). The trial's overlay adds ``ablations.runner.pruning.StudyPruning``
(optuna-integration's ``PyTorchLightningPruningCallback``, re-opening the trial from the study's storage
inside the fit process) with the space's pruner and monitor. When it stops a fit, the runner stores the
curves as for a finished trial and raises ``TrialPruned``. Grid spaces are never pruned: every grid point is
a measurement the report needs.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import yaml

from ablations.report import tensorboard_runs
from ablations.report.curves import trial_metrics
from ablations.runner import trial_timing as timing
from ablations.runner.duplicates import check_duplicate
from ablations.runner.launch import PEERS, REPO_ROOT, execute, grpo_command, runs_in_process, trainer_settings
from ablations.runner.placement import DeviceSlots, devices_needed, trainer_overrides
from ablations.runner.pruning import pruned_at
from ablations.runner.worker import WorkerPool
from ablations.spaces.space import Space
from grpo_lab.system.errors import UserError, UserFileNotFoundError

TENSORBOARD = "lightning.pytorch.loggers.TensorBoardLogger"


# ---- the trial's config --------------------------------------------------------------------------------
def nest(dotted: dict[str, Any]) -> dict[str, Any]:
    """``{"model.advantage": "rloo"}`` -> ``{"model": {"advantage": "rloo"}}``."""
    out: dict[str, Any] = {}
    for key, value in dotted.items():
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise UserError(f"config key {key!r} conflicts with a value set for {p!r}")
        node[leaf] = value
    return out


def resolve_config(path: str | Path) -> str:
    """A config path as the fit should see it: as given if it exists from here, else under the repo root."""
    p = Path(path)
    if p.is_file():
        return str(p)
    if not p.is_absolute() and (REPO_ROOT / p).is_file():
        return str(REPO_ROOT / p)
    raise UserFileNotFoundError(f"config {path!r} not found in {Path.cwd()} nor in {REPO_ROOT}")


def trial_overlay(space: Space, params: dict[str, Any], trial_dir: Path, root: Path, probe: bool = True,
                  pruning: dict[str, Any] | None = None) -> dict:
    """The per-trial YAML overlay (on the space's base config) as a nested dict; ``pruning`` = ``{"storage",
    "study_name", "trial_number"}`` adds the pruning callback (tuning spaces)."""
    dotted = space.trial_overrides(params)
    dotted["model.warm_start.cache_dir"] = str(root / "warmstart")
    cfg = nest(dotted)
    trainer = cfg.setdefault("trainer", {})
    trainer.update(enable_progress_bar=False, enable_checkpointing=False)
    trainer["logger"] = {"class_path": TENSORBOARD,
                         "init_args": {"save_dir": str(trial_dir), "name": "", "version": "",
                                                                  "default_hp_metric": False}}
    callbacks = []
    if probe and space.probes(params):
        seed = int(dotted.get("seed_everything", params.get("seed", 0)))  # with the arm's seed_offset
        callbacks.append(space.probe.callback(dotted.get("model.advantage"), seed, str(root / "probe_cache")))
    if pruning is not None and not space.is_grid:
        callbacks.append({"class_path": "ablations.runner.pruning.StudyPruning", "init_args": {
            **pruning, "monitor": space.prune_monitor, "pruner": space.pruner}})
    trainer["callbacks"] = callbacks
    return cfg


def write_overlay(cfg: dict, path: Path, note: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# written by ablations/runner/trial.py: one trial's overrides on its space's base "
                    "config\n"
                    + (f"# {note}\n" if note else "") + yaml.safe_dump(cfg, sort_keys=False))
    return path


# ---- the trial runner ----------------------------------------------------------------------------------
@dataclass
class TrialRunner:
    """Runs one trial when ``study.optimize`` calls it: see the module docstring."""

    space: Space
    study_dir: Path
    root: Path
    threads: int = 1
    probe: bool = True
    storage_url: str | None = None
    """The study's RDB URL, for the pruning callback inside the fit (tuning spaces; None: no pruning)."""
    pool: WorkerPool | None = None
    """Workers that run trials in-process (``ablations/runner/worker.py``); None: every trial is its own
    process."""
    slots: DeviceSlots | None = None
    """The study's GPUs (``placement.py``): each trial waits for the devices it needs and runs on them;
    None: trials run where their config says (the CPU)."""

    def __post_init__(self) -> None:
        self.base_config = resolve_config(self.space.base_config)

    def __call__(self, trial: optuna.Trial) -> float:
        params = self.space.suggest(trial)
        check_duplicate(trial, params)
        trial_dir = tensorboard_runs.trial_dir(self.study_dir, self.space, params, trial.number)
        if trial_dir.exists():  # left over from a deleted study of the same name
            shutil.rmtree(trial_dir)
        pruning = None if self.storage_url is None else {
            "storage": self.storage_url, "study_name": trial.study.study_name, "trial_number": trial.number}
        cfg = trial_overlay(self.space, params, trial_dir, self.root, self.probe, pruning)
        cfg["trainer"]["callbacks"].append({"class_path": timing.CLASS_PATH})  # last: after the probe's hooks
        overrides = self.space.trial_overrides(params)
        k = devices_needed(trainer_settings(self.base_config, overrides).get("devices"))
        if self.slots is not None:
            cfg["trainer"].update(trainer_overrides(k))
        overlay = write_overlay(cfg, trial_dir / "trial.yaml",
                                f"trial {trial.number} of study {trial.study.study_name!r}: {params}")
        peer = params.get("peer", "grpo_lab")
        cmd = grpo_command("fit", self.base_config, overlay, PEERS[peer])
        pool = self.pool if peer == "grpo_lab" and runs_in_process(self.base_config, overrides) else None
        trial.set_user_attr("overrides", overrides)
        trial.set_user_attr("command", shlex.join(cmd))
        trial.set_user_attr("cwd", os.getcwd())
        trial.set_user_attr("logdir", str(trial_dir))
        trial.set_user_attr("in_process", pool is not None)
        with self.slots.hold(trial.number, k) if self.slots else contextlib.nullcontext() as devices:
            if devices is not None:
                trial.set_user_attr("accelerator", "gpu")
                trial.set_user_attr("devices", devices)
            t0, start = time.perf_counter(), time.time()
            execute(cmd, trial_dir / "fit.log", self.threads, pool, env={timing.START_ENV: repr(start)},
                    devices=devices)
        returned = time.time()
        metrics = trial_metrics(trial_dir, self.space.threshold)
        metrics["wall_time_s"] = round(time.perf_counter() - t0, 2)
        metrics["timing"] = timing.finish(trial_dir, returned, time.time(), pool is not None)
        for key, value in metrics.items():
            trial.set_user_attr(key, value)
        step = pruned_at(trial) if pruning is not None else None
        if step is not None:
            raise optuna.TrialPruned(f"pruned at step {step} ({self.space.prune_monitor})")
        probed = self.probe and self.space.probe is not None
        tensorboard_runs.write_hparams(trial_dir, self.space, params, metrics, probed,
                                       step=metrics["last_step"])
        return metrics["auc"]
