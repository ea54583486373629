"""Where a trial's time goes: phase timestamps each trial writes, and their table over a study.

    python -m ablations.runner.trial_timing runs/ablate/default          # mean seconds per phase over the
    study's trials

Every trial's overlay adds :class:`TrialTiming` as its last callback (after the probe, so the probe's own
hooks run before this callback's and fall between its marks). It writes ``timing.json`` into the trial's
TensorBoard directory at teardown, and the trial runner adds what happens outside the fit
(``ablations/runner/trial.py``).
The phases of one trial, in order (seconds):

- ``start``: from the runner handing the trial over (``GRPO_LAB_TRIAL_START``, wall clock) to the CLI having
  parsed the config and built its classes: in a fresh process the interpreter, the imports of torch,
  Lightning and transformers (≈ 5.7 s on the 2-core Xeon) and the model's construction; in a reused worker
  only the config and the model;
- ``setup``: the Trainer's set-up up to the module's ``setup`` (logger, datamodule);
- ``warm_start``: the module's ``setup`` to ``on_fit_start``: loading the cached warm start, optimizers;
- ``probe_start``: ``on_fit_start`` to ``on_train_start``: the probe at the warm start (a cache hit is ~0);
- ``steps``: the optimizer steps, each ``on_train_batch_start`` → ``on_train_batch_end``;
- ``validation``: every validation loop;
- ``between_steps``: the rest of the training loop: logging, and the probe's middle points;
- ``probe_end``: the last step or validation to ``on_train_end``: the probe at the end;
- ``teardown``: ``on_train_end`` to this callback's ``teardown``;
- added by the trial runner: ``exit`` (teardown to the fit returning: the process's exit, or the in-process
  clean-up) and ``read_scalars`` (reading the TensorBoard events back).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import time
from pathlib import Path

from lightning.pytorch.callbacks import Callback

START_ENV = "GRPO_LAB_TRIAL_START"
PHASES = ("start", "setup", "warm_start", "probe_start", "steps", "validation", "between_steps", "probe_end",
          "teardown", "exit", "read_scalars")
CLASS_PATH = "ablations.runner.trial_timing.TrialTiming"


class TrialTiming(Callback):
    """Phase timestamps of one fit, written to ``<log_dir>/timing.json`` at teardown (rank 0)."""

    def __init__(self) -> None:
        start = os.environ.get(START_ENV)
        self.marks: dict[str, float] = {"start": float(start) if start else math.nan, "built": time.time()}
        self.steps = self.validation = 0.0
        self.n_steps = 0
        self._t = self._last = math.nan

    def _mark(self, name: str) -> None:
        self.marks[name] = time.time()

    def setup(self, trainer, pl_module, stage) -> None:
        self._mark("setup")

    def on_fit_start(self, trainer, pl_module) -> None:
        self._mark("fit_start")

    def on_train_start(self, trainer, pl_module) -> None:
        self._mark("train_start")
        self._last = time.time()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._t = time.time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._last = time.time()
        self.steps += self._last - self._t
        self.n_steps += 1

    def on_validation_start(self, trainer, pl_module) -> None:
        self._t = time.time()

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        self._last = time.time()
        self.validation += self._last - self._t

    def on_train_end(self, trainer, pl_module) -> None:
        self._mark("train_end")
        self.marks["loop_end"] = self._last

    def teardown(self, trainer, pl_module, stage) -> None:
        if stage != "fit" or not trainer.is_global_zero or not trainer.log_dir:
            return
        self._mark("teardown")
        Path(trainer.log_dir).mkdir(parents=True, exist_ok=True)
        (Path(trainer.log_dir) / "timing.json").write_text(json.dumps(self.phases(), indent=2) + "\n")

    def phases(self) -> dict:
        m = self.marks
        loop = m.get("loop_end", math.nan) - m.get("train_start", math.nan)
        out = {"start": m["built"] - m["start"], "setup": m.get("setup", math.nan) - m["built"],
               "warm_start": m.get("fit_start", math.nan) - m.get("setup", math.nan),
               "probe_start": m.get("train_start", math.nan) - m.get("fit_start", math.nan),
               "steps": self.steps, "validation": self.validation,
               "between_steps": loop - self.steps - self.validation,
               "probe_end": m.get("train_end", math.nan) - m.get("loop_end", math.nan),
               "teardown": m.get("teardown", math.nan) - m.get("train_end", math.nan)}
        return {"seconds": {k: round(v, 3) for k, v in out.items()}, "n_steps": self.n_steps,
                "teardown_at": m.get("teardown", math.nan), "start_at": m["start"]}


def finish(logdir: Path, fit_returned: float, read_done: float, in_process: bool) -> dict:
    """The trial's ``timing.json`` with the trial runner's phases added (``exit``, ``read_scalars``); {} if
    the fit wrote none."""
    path = Path(logdir) / "timing.json"
    if not path.is_file():
        return {}
    timing = json.loads(path.read_text())
    timing["seconds"]["exit"] = round(fit_returned - timing["teardown_at"], 3)
    timing["seconds"]["read_scalars"] = round(read_done - fit_returned, 3)
    timing["seconds"]["total"] = round(read_done - timing["start_at"], 3)
    timing["in_process"] = in_process
    path.write_text(json.dumps(timing, indent=2) + "\n")
    return timing


def throughput(study, since: datetime.datetime) -> tuple[int, int]:
    """``(trials, optimizer steps)`` of the study's trials that completed (or were pruned) after ``since``:
    the numerator of trial-steps per second."""
    from optuna.trial import TrialState

    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
            if t.datetime_complete is not None and t.datetime_complete >= since
            and "last_step" in t.user_attrs]
    return len(done), sum(int(t.user_attrs["last_step"]) + 1 for t in done)


def table(study_dir: Path) -> str:
    """Mean seconds per phase over the ``timing.json`` files under ``study_dir``, split by how trials ran."""
    rows: dict[str, list[dict]] = {}
    for path in sorted(Path(study_dir).rglob("timing.json")):
        t = json.loads(path.read_text())
        if "total" in t.get("seconds", {}):
            rows.setdefault("in-process worker" if t.get("in_process") else "own process", []).append(t)
    lines = []
    for how, ts in rows.items():
        total = sum(t["seconds"]["total"] for t in ts) / len(ts)
        lines.append(f"{how}: {len(ts)} trials, {sum(t['n_steps'] for t in ts) / len(ts):.0f} steps each, "
                     f"{total:.1f} s per trial")
        for phase in PHASES:
            mean = sum(t["seconds"].get(phase, 0.0) for t in ts) / len(ts)
            lines.append(f"  {phase:<14}{mean:8.2f} s  {mean / total:6.1%}")
    return "\n".join(lines) or f"no timing.json with a total under {study_dir}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m ablations.runner.trial_timing",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("study_dir", type=Path, help="a study's directory, e.g. runs/ablate/default")
    print(table(p.parse_args(argv).study_dir))


if __name__ == "__main__":
    main()
