"""Name -> object registries: the extension points (estimators, aggregations, KL estimators, rewards, tasks)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def registrar(registry: dict[str, T]) -> Callable[[str], Callable[[T], T]]:
    """A decorator factory: ``@register("name")`` stores the decorated object in ``registry``."""

    def register(name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            registry[name] = obj
            return obj

        return decorator

    return register


def lookup(registry: dict[str, T], name: str, what: str) -> T:
    """``registry[name]``, or a ``ValueError`` that lists the known names."""
    if name not in registry:
        raise ValueError(f"unknown {what} {name!r}; known: {', '.join(sorted(registry))}")
    return registry[name]
