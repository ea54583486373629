"""One Optuna trial = one ``grpo-lab fit`` (in a long-lived worker, or its own process); its TensorBoard
scalars become the trial's metrics.

For trial N of study S the objective

1. takes its params from the space (``GridSampler`` values, an enqueued point, or TPE samples);
2. gives up at once (``TrialPruned("duplicate of trial M")``) if another trial of the study already holds
   the same params: a COMPLETE one, or a RUNNING one that started earlier (its heartbeat still fresh, or
   it would have been failed by ``fail_stale_trials``). Ties are broken by (start time, number), so of two
   trials racing for one grid point exactly one goes on. The report therefore sees one COMPLETE trial per
   grid point, however often the study is resumed or however many workers share it;
3. writes ``runs/ablate/S/<params>/trial_N/trial.yaml`` (``<params>`` = ``advantage=rloo/seed=0``, see
   ``ablations/tensorboard_runs.py``): the space's overrides for these params, TensorBoard to that directory
   (without Lightning's constant ``hp_metric``), no progress bar or checkpoints, and as callbacks the
   gradient-variance probe and, last, ``ablations.timing.TrialTiming`` (``timing.json``: where the time went);
4. runs ``grpo-lab fit --config <space base config> --config .../trial_N/trial.yaml`` with its output in
   ``fit.log``: in a worker of the runner's ``WorkerPool`` (``ablations/worker.py``: torch and Lightning are
   imported once per worker, not once per trial) when the trial is one process (``runs_in_process``), else
   as ``python -m grpo_lab.cli fit ...`` in a process of its own (a DDP trial, or ``--no-reuse``), with
   ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` set to the runner's threads per worker. Either way the command
   is stored as the trial's ``command`` user attr (to rerun by hand from the same directory), and, on
   Linux, ``PR_SET_PDEATHSIG`` (``grpo_lab.processes``) ties the worker or the fit, and every process it
   starts (a DDP trial's second rank), to the runner: a SIGKILLed runner leaves no orphans behind. A fit
   that fails, or a worker that dies during the trial, raises ``FitFailed`` (the trial fails and is retried);
5. reads the scalars back and returns the AUC of the reward curve (the mean ``train/reward`` over
   training: the normalised area under the curve, which rewards learning early as well as learning much);
   a COMPLETE trial also writes its params and final metrics as an HParams row into its TensorBoard run.

User attrs of a COMPLETE trial (what ``report.py`` reads):

- ``curves``: ``{tag: [[step, value], ...]}`` for ``train/reward``, ``train/reward_easy``,
  ``train/reward_hard``, ``val/acc_sampled*`` and ``val/acc_greedy*``, at most 200 points each (bin means);
- ``probe``: the rows of ``probe.json`` (``{"step", "fraction", "estimator", "snr", "cosine", "variance",
  "signal", "relative_variance", "mean_norm", ...}``), empty without the probe;
- ``auc``, ``steps_to_threshold`` (first step at which the trailing moving average of ``train/reward``, over
  a full window, reaches the space's threshold; None if never) and ``last_step``;
- ``final``: the last value of every ``val/acc_*`` (``{"sampled": ..., "sampled_easy": ..., "greedy": ...}``);
- ``wall_time_s``, ``overrides`` (the trial's dotted config overrides), ``command``, ``cwd``, ``logdir``,
  ``in_process`` (run in a worker) and ``timing`` (seconds per phase, ``ablations/timing.py``).

Pruning (tuning spaces only). The trial's overlay adds ``ablations.pruning.StudyPruning``
(optuna-integration's ``PyTorchLightningPruningCallback``, re-opening the trial from the study's storage
inside the fit process) with the space's pruner and monitor. When it stops a fit, the objective stores the
curves as for a finished trial and raises ``TrialPruned``. Grid spaces are never pruned: every grid point is
a measurement the report needs.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState

from ablations import tensorboard_runs, timing
from ablations.placement import DeviceSlots, devices_needed, trainer_overrides
from ablations.pruning import pruned_at
from ablations.spaces import Space
from ablations.stats import clip_stats
from ablations.worker import WorkerDied, WorkerPool
from grpo_lab.environment import thread_env
from grpo_lab.errors import UserError, UserFileNotFoundError
from grpo_lab.processes import child_env, parent_death_preexec
from grpo_lab.tensorboard_scalars import read_scalars

REPO_ROOT = Path(__file__).resolve().parent.parent
CURVE_PREFIXES = ("train/reward", "val/acc_sampled", "val/acc_greedy")
MAX_POINTS = 200
TENSORBOARD = "lightning.pytorch.loggers.TensorBoardLogger"


class FitFailed(RuntimeError):
    """A trial's ``grpo-lab fit`` exited non-zero (the message carries the tail of its ``fit.log``)."""


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
        callbacks.append({"class_path": "ablations.pruning.StudyPruning", "init_args": {
            **pruning, "monitor": space.prune_monitor, "pruner": space.pruner}})
    trainer["callbacks"] = callbacks
    return cfg


def write_overlay(cfg: dict, path: Path, note: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# written by ablations/objective.py: one trial's overrides on its space's base config\n"
                    + (f"# {note}\n" if note else "") + yaml.safe_dump(cfg, sort_keys=False))
    return path


PEERS = {"grpo_lab": "grpo_lab.cli", "trl": "ablations.trl_peer"}
"""What trains a trial, by its ``peer`` param (the ``trl_parity`` space): grpo_lab, or TRL's GRPOTrainer on
the same config (``ablations/trl_peer.py``, always in a process of its own)."""


def grpo_command(sub: str, base_config: str, overlay: Path, module: str = "grpo_lab.cli") -> list[str]:
    """``python -m grpo_lab.cli <sub> --config <base> --config <overlay>`` (base.yaml comes first by default);
    ``module`` another entry point that takes the same arguments (``PEERS``)."""
    return [sys.executable, "-m", module, sub, "--config", base_config, "--config", str(overlay)]


# ---- running a fit -------------------------------------------------------------------------------------
def launch(cmd: list[str], log_path: Path, threads: int, cwd: str | Path | None = None,
           env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start ``cmd`` with its output in ``log_path`` and ``threads`` BLAS/OpenMP threads, tied to this
    process's life (``grpo_lab.processes``): it, and every process it starts that calls ``die_with_parent``
    (any grpo_lab entry point, e.g. a DDP fit's second rank), is SIGKILLed when the runner dies."""
    env = {**child_env(), **thread_env(threads), **(env or {})}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=cwd,
            preexec_fn=parent_death_preexec(),
        )


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def run_fit(cmd: list[str], log_path: Path, threads: int, cwd: str | Path | None = None,
            env: dict[str, str] | None = None) -> None:
    """Run ``cmd`` to completion (killing it if this thread is interrupted).

    Raises ``FitFailed`` with the log's tail if the command exits non-zero.
    """
    proc = launch(cmd, log_path, threads, cwd, env)
    try:
        rc = proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    if rc != 0:
        raise FitFailed(f"`{shlex.join(cmd)}` exited with {rc}; last lines of "
                        f"{log_path}:\n{log_tail(log_path)}")


def trainer_settings(base_config: str | Path, overrides: dict[str, Any]) -> dict[str, Any]:
    """A trial's ``trainer`` settings after base.yaml, the space's base config and the trial's overrides."""
    trainer: dict[str, Any] = {}
    for path in (REPO_ROOT / "configs" / "base.yaml", base_config):
        if Path(path).is_file():
            trainer.update((yaml.safe_load(Path(path).read_text()) or {}).get("trainer") or {})
    trainer.update({k.removeprefix("trainer."): v for k, v in overrides.items() if k.startswith("trainer.")})
    return trainer


def runs_in_process(base_config: str | Path, overrides: dict[str, Any]) -> bool:
    """Whether a trial can run inside a worker (``ablations/worker.py``): one process, i.e. the Trainer's
    strategy is ``auto`` and it has one device and one node, after base.yaml, the space's base config and
    the trial's overrides. Several processes need their own: Lightning's DDP launcher starts the other
    ranks by running ``sys.argv`` again, and ``torch.distributed``'s state would outlive the trial."""
    trainer = trainer_settings(base_config, overrides)
    return trainer.get("strategy", "auto") in ("auto", None) and str(trainer.get("devices", 1)) == "1" \
        and str(trainer.get("num_nodes", 1)) == "1"


def execute(cmd: list[str], log_path: Path, threads: int, pool: WorkerPool | None = None,
            env: dict[str, str] | None = None, devices: list[str] | None = None) -> None:
    """Run ``grpo_command(...)``: in a worker of ``pool`` (its arguments after ``-m grpo_lab.cli``), or as
    its own process without one; ``devices``: on those GPUs only (``CUDA_VISIBLE_DEVICES``, a worker of
    theirs). Raises ``FitFailed`` with the log's tail if it fails or its worker dies."""
    visible = None if devices is None else ",".join(devices)  # its CUDA_VISIBLE_DEVICES
    if visible is not None:
        env = {**(env or {}), "CUDA_VISIBLE_DEVICES": visible}
    if pool is None:
        return run_fit(cmd, log_path, threads, env=env)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_bytes(b"")
    try:
        status = pool.run(cmd[3:], log_path, env, visible)
    except WorkerDied as err:
        raise FitFailed(f"{err}; last lines of {log_path}:\n{log_tail(log_path)}") from None
    if status != 0:
        raise FitFailed(f"`{shlex.join(cmd)}` exited with {status} in a worker; last lines of {log_path}:\n"
                        f"{log_tail(log_path)}")


# ---- metrics from the scalars --------------------------------------------------------------------------
def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average (the first points average what there is so far)."""
    values = np.asarray(values, dtype=float)
    if window <= 1 or len(values) == 0:
        return values
    c = np.cumsum(np.insert(values, 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(0, idx - window)
    return (c[idx] - c[lo]) / (idx - lo)


def auc(points: list[tuple[int, float]]) -> float:
    """Normalised area under a curve: trapezoid area / step span (a single point: its value)."""
    if not points:
        return float("nan")
    steps, values = np.array(points, dtype=float).T
    if len(steps) == 1 or steps[-1] == steps[0]:
        return float(values.mean())
    return float(np.trapezoid(values, steps) / (steps[-1] - steps[0]))


def steps_to_threshold(points: list[tuple[int, float]], threshold: float,
                       window: int | None = None) -> int | None:
    """First step at which the mean of the last ``window`` values reaches ``threshold``; None if never.

    Only full windows count (from the ``window``-th point on), so one lucky early batch does not count as
    learned. The default window is a tenth of the curve, between 3 and 20 points.
    """
    if not points:
        return None
    steps, values = np.array(points, dtype=float).T
    window = min(len(values), window or max(3, min(20, len(values) // 10)))
    full = np.convolve(values, np.ones(window) / window, mode="valid")  # full[i] ends at point i + window - 1
    hit = np.nonzero(full >= threshold)[0]
    return int(steps[hit[0] + window - 1]) if len(hit) else None


def downsample(points: list[tuple[int, float]], max_points: int = MAX_POINTS) -> list[list[float]]:
    """At most ``max_points`` ``[step, value]`` pairs: consecutive points averaged in equal bins."""
    if len(points) <= max_points:
        return [[int(s), float(v)] for s, v in points]
    arr = np.array(points, dtype=float)
    return [[float(b[:, 0].mean()), float(b[:, 1].mean())] for b in np.array_split(arr, max_points)]


def _dedup(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """Sorted by step, the last value kept where a step was logged twice (e.g. a resumed event file)."""
    return sorted(dict(points).items())


def trial_metrics(logdir: Path, threshold: float) -> dict[str, Any]:
    """The user attrs of a finished trial, from its TensorBoard scalars and ``probe.json``."""
    scalars = {tag: _dedup(pts) for tag, pts in read_scalars(logdir).items()}
    reward = scalars.get("train/reward")
    if not reward:
        raise FitFailed(f"no train/reward scalars under {logdir}; the fit logged nothing (see fit.log)")
    probe_file = Path(logdir) / "probe.json"
    probe = json.loads(probe_file.read_text()) if probe_file.is_file() else []
    if isinstance(probe, dict):  # {"config": ..., "results": [rows]}
        probe = probe.get("results", [])
    return {
        "auc": auc(reward),
        "steps_to_threshold": steps_to_threshold(reward, threshold),
        "final": {tag.removeprefix("val/acc_"): pts[-1][1]
                  for tag, pts in scalars.items() if tag.startswith("val/acc_")},
        "curves": {tag: downsample(pts) for tag, pts in scalars.items() if tag.startswith(CURVE_PREFIXES)},
        "probe": probe,
        "last_step": int(reward[-1][0]),
        "grad_clip": clip_stats([v for _, v in scalars.get("train/grad_norm", [])], max_grad_norm(logdir)),
    }


def max_grad_norm(logdir: Path) -> float | None:
    """``model.max_grad_norm`` of the fit's saved ``config.yaml`` (LightningCLI writes it to the log dir);
    base.yaml's 1.0 when the file is missing."""
    path = Path(logdir) / "config.yaml"
    model = (yaml.safe_load(path.read_text()) or {}).get("model", {}) if path.is_file() else {}
    return model.get("max_grad_norm", 1.0)


# ---- duplicates ----------------------------------------------------------------------------------------
def find_duplicate(trials: list[FrozenTrial], number: int, params: dict[str, Any],
                   start) -> FrozenTrial | None:
    """Another trial that owns ``params``: COMPLETE, or RUNNING and started before (start, number). A
    RUNNING trial owns the point of its params, of its enqueued ``fixed_params``, or of its GridSampler
    ``grid_id`` (with the same search space) when that is this trial's too: those are set before a trial
    suggests its params, so a trial whose params are still being written is seen (GridSampler hands a
    running point to a second worker once every point has started)."""
    me = next((t for t in trials if t.number == number), None)
    grid = _grid_point(me) if me is not None else None
    for t in trials:
        if t.number == number:
            continue
        if t.state == TrialState.COMPLETE and t.params == params:
            return t
        if t.state == TrialState.RUNNING and t.datetime_start is not None and start is not None:
            owns = (t.params == params or t.system_attrs.get("fixed_params") == params
                    or (grid is not None and _grid_point(t) == grid))
            if owns and (t.datetime_start, t.number) < (start, number):
                return t
    return None


def _grid_point(t: FrozenTrial) -> tuple | None:
    """``(grid_id, search space)`` that GridSampler gave the trial, or None."""
    attrs = t.system_attrs
    return (attrs["grid_id"], attrs.get("search_space")) if "grid_id" in attrs else None


def check_duplicate(trial: optuna.Trial, params: dict[str, Any]) -> None:
    """Raise ``TrialPruned("duplicate of trial M")`` if another trial owns ``params`` (see the docstring)."""
    dup = find_duplicate(trial.study.get_trials(deepcopy=False), trial.number, params, trial.datetime_start)
    if dup is not None:
        trial.set_user_attr("duplicate_of", dup.number)
        raise optuna.TrialPruned(f"duplicate of trial {dup.number}")


# ---- the objective -------------------------------------------------------------------------------------
@dataclass
class Objective:
    """Callable objective for ``study.optimize``: see the module docstring."""

    space: Space
    study_dir: Path
    root: Path
    threads: int = 1
    probe: bool = True
    storage_url: str | None = None
    """The study's RDB URL, for the pruning callback inside the fit (tuning spaces; None: no pruning)."""
    pool: WorkerPool | None = None
    """Workers that run trials in-process (``ablations/worker.py``); None: every trial is its own process."""
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
