"""Name -> object registries: the extension points (estimators, aggregations, KL estimators, rewards, tasks).

Every registry is selected by a string: a registered name (``group_norm``) or an import path
``package.module:attribute`` that the user names. Code is imported only from such a path, never by scanning.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, TypeVar

from grpo_lab.errors import UserError

T = TypeVar("T")


def registrar(registry: dict[str, T]) -> Callable[[str], Callable[[T], T]]:
    """A decorator factory: ``@register("name")`` stores the decorated object in ``registry``."""

    def register(name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            registry[name] = obj
            return obj

        return decorator

    return register


def import_object(spec: str, what: str) -> Any:
    """The object at ``package.module:attribute`` (a dotted attribute path is allowed after the colon).

    Raises ``ValueError`` naming ``what``, the path and the cause when the module cannot be imported or has no
    such attribute."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UserError(f"{what} {spec!r}: an import path must look like 'package.module:name'")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise UserError(f"{what} {spec!r}: cannot import module {module_name!r} ({err})") from err
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UserError(f"{what} {spec!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def lookup(registry: dict[str, T], name: str, what: str, wrap: Callable[[Any], T] | None = None) -> T:
    """``registry[name]``, or the object at the import path ``name`` (``package.module:attribute``), or a
    ``ValueError`` that lists the known names.

    An imported object must be callable; ``wrap`` turns it into the registry's value type (for registries
    that store more than the function). If importing the module registered the object under a name, that
    entry is returned, so a decorated function behaves the same whether it is named or imported.
    """
    if name in registry:
        return registry[name]
    if ":" not in name:
        raise UserError(
            f"unknown {what} {name!r}; known: {', '.join(sorted(registry))} "
            "(or an import path 'package.module:name')"
        )
    obj = import_object(name, what)
    if not callable(obj):
        raise UserError(f"{what} {name!r}: {type(obj).__name__} is not callable")
    for value in registry.values():
        if value is obj or getattr(value, "fn", None) is obj:
            return value
    return wrap(obj) if wrap is not None else obj
