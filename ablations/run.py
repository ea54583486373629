"""``grpo-lab-ablate``: run a named ablation space as a resumable Optuna study, then write its report.

    grpo-lab-ablate --space default                # make ablate: 3 estimators + an A/A arm x 8 seeds
    grpo-lab-ablate --space smoke                  # make ablate-smoke: the harness end to end in a minute
    grpo-lab-ablate --space default --report-only  # rewrite report.md and the plots from the stored study
    grpo-lab-ablate --space default --until-decisive --budget 20m  # seeds until intervals are ±SESOI/2
    grpo-lab-ablate --space default --until-decisive --snr-precision 0.10  # make ablate-precise: and until
                                           # every SNR ratio is within ±10% (pooled and at each probe point)
    grpo-lab-ablate --space default --storage postgresql://user@host/db  # many runners share one study
    GRPO_LAB_STORAGE=postgresql://user:PASSWORD@host/db grpo-lab-ablate  # the URL out of history and ps
    grpo-lab-ablate --space smoke --accelerator gpu --devices 0,1 --trials-per-device 2  # on GPUs (below)

Layout (``--root`` defaults to ``runs``)::

    runs/ablate/<study>.db                 the SQLite study (unless --storage names another database)
    runs/ablate/<study>/warmstart.log      the warm start built once before the trials
    runs/ablate/<study>/<params>/trial_N/  trial.yaml, fit.log, TensorBoard events, probe.json; <params> is
                                           e.g. advantage=rloo/seed=0 (the run's name in TensorBoard)
    runs/ablate/<study>/report.md, *.png   the report and summary.json (ablations/report/markdown.py,
    summary.py)
    runs/probe_cache/                      probe points computed once per policy (the warm start, per seed)

How a study runs:

1. The study is created or loaded (``load_if_exists``) on an ``RDBStorage`` with heartbeats: a RUNNING
   trial whose runner stops beating for ``--grace-period`` seconds is marked FAIL by
   ``fail_stale_trials`` (called at start, before every round and by Optuna before every trial), and
   ``RetryHeartbeatStaleTrialCallback`` (Optuna >= 4.9's name for ``RetryFailedTrialCallback``)
   re-enqueues it, at most twice. A rerun right after a kill therefore first waits up to the grace period.
   A trial killed before its first heartbeat has none and would never go stale: the runner gives every
   RUNNING trial one heartbeat when it starts (``storage.beat_for_silent_trials``).
2. The warm start is built once by a ``grpo-lab warmstart`` subprocess with the first point's config, so
   the trials only load it (the cache key ignores the swept RL settings).
3. Round 1 lets ``GridSampler`` hand out the grid points; it stops the study once every point was
   *visited*, including points whose fit failed or whose trial was pruned as a duplicate. Later rounds
   therefore enqueue every point that still has no COMPLETE trial (and no WAITING or RUNNING one) and
   optimize exactly those, until every point is COMPLETE or has failed ``--max-failures`` times. Points
   held by a RUNNING trial of another runner (or of a killed one, until its heartbeat goes stale) are
   waited for, not duplicated; the trial runner's duplicate check makes sure of it (``runner/trial.py``).
   Rerunning the same command after an interruption, even a SIGKILL, keeps every finished trial and runs
   only what is missing. ``--until-decisive`` then adds seeds in rounds (``sequential.py``).

Parallelism: ``study.optimize(n_jobs=N)`` threads, each running one trial at a time in a long-lived worker
process of the runner's ``WorkerPool`` (``ablations/runner/worker.py``): a thread only waits on its worker,
so the
GIL costs nothing, and each worker has its own torch thread pool (``OMP_NUM_THREADS`` = threads per worker)
and imports torch, Lightning and transformers once, not once per trial (≈ 6 s of CPU each time, 9% of a trial
of the former default study and 60% of a smoke trial; ``ablations/runner/trial_timing.py`` measures every
phase). A trial
gives the same curves in a worker as in its own process (tested bit for bit); a crash inside a fit is the
trial's failure, not the runner's; a dead worker fails its trial and is replaced. Trials of several
processes (DDP) run as their own ``python -m grpo_lab.cli fit`` process, and ``--no-reuse`` runs every trial
that way. For several machines, start one runner per machine on a shared ``postgresql://`` storage.

Every process a trial starts dies with the runner, the workers and a DDP trial's second rank included
(``grpo_lab.system.processes``: each worker and fit, and each process it starts, is SIGKILLed by the kernel
when its
parent dies). DDP trials get the same ``OMP_NUM_THREADS`` per process, so run the ``strategies`` space with
``--n-jobs 1``.

GPUs (``--accelerator gpu``): ``--devices auto`` or ``0,1,...``, up to ``--trials-per-device`` trials on
each at once; a trial gets as many free GPUs as its ``trainer.devices`` and records them (``placement.py``).
Each runner places trials on its own machine's GPUs (runners sharing a ``postgresql://`` study use theirs).
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import sys
import time
import warnings
from pathlib import Path

import optuna
import sqlalchemy.exc
from optuna.trial import TrialState

from ablations.report.summary import DEFAULT_MIN_EFFECT, add_wall_time, min_effects
from ablations.runner.launch import log_tail, runs_in_process
from ablations.runner.placement import (
    DeviceSlots,
    check_fits,
    make_placement,
    visible_device_count,
)
from ablations.runner.progress import console, point_status
from ablations.runner.sequential import check_arguments, parse_duration, run_until_decisive
from ablations.runner.storage import (
    ENV_URL,
    STORAGE_ENV,
    beat_for_silent_trials,
    fail_stale,
    is_connection_loss,
    lost_connection,
    make_storage,
    public_url,
    storage_url,
    trial_storage_url,
)
from ablations.runner.study_loop import (
    build_warm_start,
    devices_per_trial,
    open_study,
    prestart,
    run_grid,
    run_tuning,
)
from ablations.runner.trial import TrialRunner
from ablations.runner.trial_timing import throughput
from ablations.runner.worker import WorkerPool
from ablations.spaces.space import SPACES, get_space
from grpo_lab.system.entry import run_cli
from grpo_lab.system.errors import UserError


# ---- command line --------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="grpo-lab-ablate", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--space", default="default",
                   help=f"named search space ({', '.join(sorted(SPACES))}) or 'module:attribute' of your own "
                        "Space")
    p.add_argument("--study", default=None,
                   help="study name (default: the space name); rerun the same name to resume")
    p.add_argument("--storage", default=None,
                   help=f"Optuna RDB URL (default: ${STORAGE_ENV}, else "
                        "sqlite:///<root>/ablate/<study>.db); a postgresql://user@host/db URL lets many "
                        "runners on many machines share one study (a "
                        f"password is safer in ${STORAGE_ENV} or ~/.pgpass than on the command line; it is "
                        "never printed)")
    p.add_argument("--root", default="runs",
                   help="directory for the study database, trial directories and warm starts")
    p.add_argument("--n-jobs", type=int, default=None,
                   help="trials run in parallel (default: the CPU cores, at most the grid size); each gets "
                        "max(1, cores // n_jobs) torch threads")
    p.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu"],
                   help="where the trials run: cpu (as their config says), or gpu, placed on --devices")
    p.add_argument("--devices", default="auto",
                   help="--accelerator gpu: the GPUs to place trials on, 'auto' (every GPU torch sees) or "
                        "indices such as 0,1; a trial gets as many as its trainer.devices")
    p.add_argument("--trials-per-device", type=int, default=1,
                   help="--accelerator gpu: trials that share one GPU at a time (each in its own worker)")
    p.add_argument("--max-failures", type=int, default=3,
                   help="give up on a grid point after this many failed fits")
    p.add_argument("--grace-period", type=int, default=30,
                   help="seconds without a heartbeat after which a RUNNING trial counts as dead and is "
                        "retried")
    p.add_argument("--no-probe", action="store_true",
                   help="run the trials without the gradient-variance probe")
    p.add_argument("--no-reuse", action="store_true",
                   help="start a fresh process for every trial instead of running them in long-lived workers "
                        "(ablations/runner/worker.py; multi-process trials always get their own)")
    p.add_argument("--no-report", action="store_true", help="run the trials but do not write the report")
    p.add_argument("--report-only", action="store_true",
                   help="only (re)write the report from the stored study")
    p.add_argument("--until-decisive", action="store_true",
                   help="add seeds in rounds until every comparison's interval is within ±half its "
                        "smallest effect of interest, or the budget is spent: a stopping rule on precision, "
                        "not significance, so the verdicts keep their error rates "
                        "(ablations/runner/sequential.py)")
    p.add_argument("--budget", default="20m",
                   help="--until-decisive: wall-time budget of the study (20m, 90s, 1.5h)")
    p.add_argument("--min-effect", type=float, default=None,
                   help="smallest AUC difference of interest, the SESOI (default 0.02): the equivalence "
                        "test's margin and the size a verdict is judged against")
    p.add_argument("--min-snr-effect", type=float, default=None,
                   help="smallest relative SNR difference of interest (default 0.10, i.e. x1.10): the SNR "
                        "ratio's equivalence margin")
    p.add_argument("--snr-precision", type=float, default=None, metavar="H",
                   help="--until-decisive: also add seeds until every SNR ratio's 95%% interval, pooled and "
                        "at each probe point, is within ±H of the ratio (e.g. 0.10)")
    p.add_argument("--round-seeds", type=int, default=2, help="--until-decisive: seeds added per round")
    p.add_argument("--max-seeds", type=int, default=64, help="--until-decisive: stop at this many seeds")
    p.add_argument("--debug", action="store_true",
                   help="show the traceback of a user error (bad space, storage, study) instead of one line; "
                        "the trials' fit.log files get full tracebacks too (also: GRPO_LAB_DEBUG=1)")
    return p


def main(argv: list[str] | None = None) -> int:
    """``grpo-lab-ablate``: a bad flag, space or storage URL is one ``error:`` line and exit status 2
    (``--debug`` for the traceback; see ``grpo_lab.system.errors``). Returns the exit status."""
    return run_cli(_main, argv)


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    check_arguments(args.round_seeds, args.max_seeds, args.snr_precision, args.until_decisive)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # Optuna's own calls too
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    space = get_space(args.space)
    name = args.study or space.name
    root = Path(args.root)
    study_dir = root / "ablate" / name
    url = storage_url(args.storage, root, name)
    try:
        storage = make_storage(url, args.grace_period)
    except sqlalchemy.exc.ArgumentError as err:  # not a URL, or an unknown database dialect
        raise UserError(f"--storage {public_url(url)!r} is not a database URL SQLAlchemy can open "
                        f"({public_url(str(err))})") from None

    from ablations.report.markdown import write_report  # matplotlib only when needed

    if args.report_only:
        try:
            study = optuna.load_study(study_name=name, storage=storage)
        except KeyError:
            raise UserError(f"no study {name!r} in {public_url(url)}: run without --report-only "
                            "first") from None
        console.print(f"report: {write_report(study, study_dir, min_effects(args))}")
        return 0

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    size = len(space.points()) if space.is_grid else (space.n_trials or 1)
    placement = make_placement(args.accelerator, args.devices, args.trials_per_device,
                               visible_device_count() if args.accelerator == "gpu" else 0,
                               os.environ.get("CUDA_VISIBLE_DEVICES"))
    if placement is not None:
        check_fits(devices_per_trial(space), placement)
    n_jobs = max(1, min(args.n_jobs or (placement.capacity if placement else cores), size))
    threads = max(1, cores // n_jobs)
    study = open_study(space, name, storage)
    fail_stale(study)
    beat_for_silent_trials(study, storage)  # a trial killed before its first heartbeat must go stale too
    pool = None if args.no_reuse else WorkerPool(threads, study_dir / "workers.log")
    if trial_storage_url(url) == ENV_URL:  # trials (their pruning callback) read the password from here
        os.environ[STORAGE_ENV] = url
    trial_runner = TrialRunner(space, study_dir, root, threads=threads, probe=not args.no_probe,
                               storage_url=trial_storage_url(url), pool=pool,
                               slots=DeviceSlots(placement) if placement else None)
    console.print(f"study {name!r} ({space.description}) on {public_url(url)}: {size} trials, {n_jobs} "
                  f"workers x {threads} threads" + ("" if pool else ", a fresh process per trial"))
    if placement is not None:
        console.print(f"trials placed on GPU {','.join(placement.devices)}, at most "
                      f"{placement.trials_per_device} per GPU")
    t0, since = time.perf_counter(), datetime.datetime.now()
    gave_up: list[dict] = []
    complete = point_status(study.get_trials(deepcopy=False), space.points()) if space.is_grid else {}
    try:
        if not space.is_grid or args.until_decisive or any(not c["COMPLETE"] for c in complete.values()):
            if pool is not None and any(runs_in_process(trial_runner.base_config, space.trial_overrides(p))
                                        for p in (space.points() or [{}])):
                prestart(pool, n_jobs, placement)  # the second worker imports while the first builds the warm
                # start
            # One thread per worker here too: two threads on two busy cores measured 20x slower than one.
            build_warm_start(space, trial_runner, study_dir, threads)
            if args.until_decisive:
                gave_up = run_until_decisive(study, space, trial_runner, n_jobs, parse_duration(args.budget),
                                             {**DEFAULT_MIN_EFFECT, **min_effects(args)}, args.round_seeds,
                                             args.max_seeds, args.max_failures, say=console.print,
                                             storage=storage, precision=args.snr_precision)["gave_up"]
            elif space.is_grid:
                gave_up = run_grid(study, space, trial_runner, n_jobs, args.max_failures)["gave_up"]
            else:
                run_tuning(study, space, trial_runner, n_jobs)
    except Exception as err:
        if is_connection_loss(err):  # the server went away mid-study: one line, the finished trials are kept
            raise lost_connection(url, err) from None
        raise
    finally:
        if pool is not None:
            pool.close()
    wall = time.perf_counter() - t0
    trials, steps = throughput(study, since)
    console.print(f"trials done in {wall:.0f} s: {trials} trials, {steps} optimizer steps, "
                  f"{steps / wall:.2f} trial-steps/s"
                  + (f" ({pool.started} worker processes)" if pool else ""))
    add_wall_time(study, wall)
    if gave_up:
        console.print(f"[red]gave up on {len(gave_up)} point(s) after {args.max_failures} failures: "
                      f"{gave_up}[/red]")
        failed = [t for t in study.get_trials(deepcopy=False)
                  if t.state == TrialState.FAIL and t.user_attrs.get("logdir")]
        if failed:
            console.print(log_tail(Path(failed[-1].user_attrs["logdir"]) / "fit.log", 15))
    if not args.no_report:
        console.print(f"report: {write_report(study, study_dir, min_effects(args))}")
    return 1 if gave_up else 0


if __name__ == "__main__":
    sys.exit(main())
