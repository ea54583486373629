"""Trials placed on GPUs: which devices each trial of a study runs on (``grpo-lab-ablate --accelerator gpu``).

The runner holds a :class:`DeviceSlots` over the study's devices (``--devices auto`` or ``0,1,...``): each
device has ``--trials-per-device`` slots, and a trial that needs k devices (``trainer.devices`` of its
config, e.g. 2 for the ``strategies`` space's ``ddp2``) waits for one free slot on each of k different
devices, the least loaded first (ties: the order of ``--devices``). The trial then runs with
``CUDA_VISIBLE_DEVICES`` set to those devices and ``trainer.accelerator: gpu``, ``trainer.devices: k`` in its
overlay; in-process trials run in a worker started with that ``CUDA_VISIBLE_DEVICES`` (``worker.py``: CUDA
reads it once, so a worker stays on its devices). The trial records them (user attrs ``accelerator`` and
``devices``, the ids as ``nvidia-smi`` numbers them). Whatever ends a trial, a finished fit, a failed one or
a worker that died under it, gives its slots back (:meth:`DeviceSlots.hold` is a context manager), so a
dead worker's device takes the next trial; a slot is never handed out twice (tested under threads), and
a trial that needs more devices than the study has is refused before anything runs.

Everything here but :func:`visible_device_count` is pure: a fake device list tests it without a GPU.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from grpo_lab.system.errors import UserError

ACCELERATORS = ("cpu", "gpu")


@dataclass(frozen=True)
class Placement:
    """Where a study's trials run: ``devices`` (CUDA ids as the machine numbers them) with
    ``trials_per_device`` slots each."""

    devices: tuple[str, ...]
    trials_per_device: int = 1

    @property
    def capacity(self) -> int:
        """Trials of one device each that can run at once."""
        return len(self.devices) * self.trials_per_device


# ---- the command line's choices ------------------------------------------------------------------------
def parse_devices(spec: str, count: int) -> list[int]:
    """``auto`` -> every visible device ``[0, count)``; ``"0,2"`` -> ``[0, 2]`` (each < ``count``, once)."""
    if spec.strip() == "auto":
        return list(range(count))
    try:
        ids = [int(part) for part in spec.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"--devices {spec!r}: give 'auto' or GPU indices separated by commas, e.g. "
                        "0,1") from None
    if not ids or len(set(ids)) != len(ids) or any(i < 0 for i in ids):
        raise UserError(f"--devices {spec!r}: give 'auto' or distinct GPU indices >= 0, e.g. 0,1")
    missing = [i for i in ids if i >= count]
    if missing:
        raise UserError(f"--devices {spec!r}: GPU {missing[0]} does not exist, this machine shows {count} "
                        f"(indices 0 to {count - 1})")
    return ids


def physical_ids(indices: Sequence[int], visible: str | None) -> tuple[str, ...]:
    """The ``CUDA_VISIBLE_DEVICES`` entries of device ``indices`` as torch numbers them: the runner's own
    ``CUDA_VISIBLE_DEVICES`` (``visible``; None or empty: all devices, in order) maps index i to its i-th
    entry, so a worker restricted further sees the devices the runner meant."""
    entries = [v.strip() for v in (visible or "").split(",") if v.strip()]
    return tuple(entries[i] if entries else str(i) for i in indices)


def make_placement(accelerator: str, devices: str, trials_per_device: int, count: int,
                   visible: str | None = None) -> Placement | None:
    """The placement of ``--accelerator``/``--devices``/``--trials-per-device`` on a machine with ``count``
    visible GPUs (None for ``cpu``: trials run where their config says). Every mistake is a ``UserError``."""
    if accelerator not in ACCELERATORS:
        raise UserError(f"--accelerator {accelerator!r}: give one of {', '.join(ACCELERATORS)}")
    if trials_per_device < 1:
        raise UserError(f"--trials-per-device must be >= 1, got {trials_per_device}")
    if accelerator == "cpu":
        if devices.strip() != "auto":
            raise UserError(f"--devices {devices!r} places trials on GPUs: add --accelerator gpu")
        return None
    if count == 0:
        raise UserError("--accelerator gpu: no CUDA GPU is visible here (torch.cuda.device_count() is 0); "
                        "run with --accelerator cpu, or on a machine with a GPU")
    return Placement(physical_ids(parse_devices(devices, count), visible), trials_per_device)


def visible_device_count() -> int:
    """``torch.cuda.device_count()`` (0 without CUDA); torch is imported only when GPUs are asked for."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


# ---- what a trial needs --------------------------------------------------------------------------------
def devices_needed(value: Any) -> int:
    """k, the devices of a trial whose config says ``trainer.devices: value``: an int > 0 or its string, a
    list of ids or ``"0,1"`` (their number); ``auto``, ``-1`` or unset: 1 (the runner chooses)."""
    if isinstance(value, (list, tuple)):
        return max(1, len(value))
    text = str(value).strip() if value is not None else "auto"
    if "," in text:
        return len([part for part in text.split(",") if part.strip()])
    if text.lstrip("-").isdigit() and int(text) > 0:
        return int(text)
    return 1


def check_fits(needed: Iterable[int], placement: Placement) -> None:
    """Refuse (``UserError``) a study with a trial that needs more devices than ``placement`` has."""
    k = max(needed, default=1)
    if k > len(placement.devices):
        raise UserError(f"a trial of this space runs on {k} devices (trainer.devices), but --devices gives "
                        f"{len(placement.devices)} ({','.join(placement.devices)}): give more GPUs, or a "
                        "space whose trials need fewer")


def trainer_overrides(k: int) -> dict[str, Any]:
    """What a placed trial's overlay sets in ``trainer``: its k devices are all it sees."""
    return {"accelerator": "gpu", "devices": k}


def worker_devices(placement: Placement, n: int) -> dict[str, int]:
    """How many of ``n`` parallel one-device trials each device takes first (round robin): the workers to
    start ahead, per device."""
    order = [d for _ in range(placement.trials_per_device) for d in placement.devices][:n]
    return {d: order.count(d) for d in placement.devices if d in order}


def choose(load: dict[str, int], k: int, per_device: int) -> list[str] | None:
    """k different devices with a free slot (load < ``per_device``), the least loaded first, ties in the
    order of ``load``; None when fewer than k have one."""
    free = [d for d in load if load[d] < per_device]
    if len(free) < k:
        return None
    order = {d: i for i, d in enumerate(load)}
    return sorted(free, key=lambda d: (load[d], order[d]))[:k]


# ---- the runner's slots --------------------------------------------------------------------------------
class DeviceSlots:
    """The slots of a :class:`Placement`, shared by the runner's threads: :meth:`hold` waits for k devices
    with a free slot and gives them back when the trial ends, however it ends."""

    def __init__(self, placement: Placement) -> None:
        self.placement = placement
        self._load = dict.fromkeys(placement.devices, 0)
        self._held: dict[Hashable, list[str]] = {}
        self._changed = threading.Condition()

    def acquire(self, owner: Hashable, k: int, timeout: float | None = None) -> list[str] | None:
        """k devices for ``owner`` (waiting up to ``timeout`` seconds, None: until some are freed); None
        after a timeout. ``ValueError`` when k is more than the devices there are (it would wait forever)
        or ``owner`` already holds some."""
        if not 1 <= k <= len(self._load):
            raise ValueError(f"a trial needs {k} devices, the placement has {len(self._load)}")
        with self._changed:
            if owner in self._held:
                raise ValueError(f"{owner!r} already holds devices {self._held[owner]}")
            if not self._changed.wait_for(lambda: choose(self._load, k, self.placement.trials_per_device)
                                          is not None, timeout):
                return None
            devices = choose(self._load, k, self.placement.trials_per_device)
            for d in devices:
                self._load[d] += 1
            self._held[owner] = devices
            return list(devices)

    def release(self, owner: Hashable) -> list[str]:
        """Give ``owner``'s devices back (none held: nothing); the devices freed."""
        with self._changed:
            devices = self._held.pop(owner, [])
            for d in devices:
                self._load[d] -= 1
            self._changed.notify_all()
            return devices

    @contextlib.contextmanager
    def hold(self, owner: Hashable, k: int) -> Iterator[list[str]]:
        """``with slots.hold(trial.number, k) as devices:`` the devices, given back on the way out."""
        devices = self.acquire(owner, k)
        try:
            yield devices
        finally:
            self.release(owner)

    def load(self) -> dict[str, int]:
        """Trials on each device now."""
        with self._changed:
            return dict(self._load)

    def held(self) -> dict[Hashable, list[str]]:
        """Each owner's devices now."""
        with self._changed:
            return {o: list(d) for o, d in self._held.items()}
