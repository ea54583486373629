"""The scalars of a TensorBoard run directory, read back (for tests, measurements and reports)."""

from __future__ import annotations

from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def read_scalars(logdir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` of every scalar under ``logdir`` (all event files merged)."""
    out: dict[str, list[tuple[int, float]]] = {}
    for events in sorted(Path(logdir).rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


def learning_lift(values: list[float], fraction: float = 0.1) -> tuple[float, float]:
    """Mean of the first and of the last ``fraction`` of a curve (at least one point each)."""
    k = max(1, int(len(values) * fraction))
    return sum(values[:k]) / k, sum(values[-k:]) / k
