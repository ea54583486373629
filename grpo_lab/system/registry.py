"""Name -> object registries: the extension points (estimators, aggregations, KL estimators, rewards, tasks).

Every registry is selected by a string: a registered name (``group_norm``) or an import path
``package.module:attribute`` that the user names. Code is imported only from such a path, never by scanning.

A name is registered once (as verl's ``register_adv_est``): registering another object under a taken name
raises ``ValueError`` (a ``UserError``) naming the registry and the name, so a user's ``exact_match`` never
silently replaces ours. Registering the same definition again is allowed and replaces the entry: the same
object (an imported ``Space`` that ``get_space`` registers again), an equal value (a frozen dataclass), or a
function or class with the same module and qualified name (its module reloaded, e.g. after an edit in a
notebook; or a function that registers a local closure run twice). Lambdas have no telling name: only the same
lambda object counts as the same definition.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, TypeVar

from grpo_lab.system.errors import UserError

T = TypeVar("T")


def _definition(obj: Any) -> tuple[str, str] | None:
    """``(module, qualified name)`` of a function or class (of the ``fn`` a wrapper holds); None for a lambda
    or a value without a name."""
    obj = getattr(obj, "fn", obj)
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(qualname, str) or "<lambda>" in qualname:
        return None
    return module, qualname


def same_definition(old: Any, new: Any) -> bool:
    """``new`` is ``old`` registered again: the same object, an equal value, or the same function or class
    re-created (same module and qualified name, not a lambda)."""
    if old is new or old == new:
        return True
    return _definition(old) is not None and _definition(old) == _definition(new)


def register(registry: dict[str, T], name: str, obj: T, what: str) -> T:
    """``registry[name] = obj``, unless another definition holds ``name``: then a ``ValueError`` naming the
    registry (``what``: ``reward``, ``space``, ...) and the name."""
    if name in registry and not same_definition(registry[name], obj):
        held = _definition(registry[name])
        by = f" by {held[0]}.{held[1]}" if held else ""
        raise UserError(f"{what} {name!r} is already registered{by}: register the new {what} under another "
                        "name")
    registry[name] = obj
    return obj


def registrar(registry: dict[str, T], what: str) -> Callable[[str], Callable[[T], T]]:
    """A decorator factory: ``@register("name")`` stores the decorated object in ``registry`` (a taken name
    raises, see :func:`register`; ``what`` names the registry in that error)."""

    def register_as(name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            return register(registry, name, obj, what)

        return decorator

    return register_as


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
