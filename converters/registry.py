"""The op registry: one lowering per ATen overload (or Python callable in the graph).

A lowering is a small pure function taking the node's arguments with tensors replaced by
`jax.Array`s. Registering a lowering for an op also keeps that op whole during
decomposition (see `converters.capture`), so high-level ops reach JAX as one primitive.

Example:
    >>> from converters.registry import lowering
    >>> @lowering(torch.ops.aten.relu.default)
    ... def relu(x):
    ...     return jax.nn.relu(x)
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
from typing import Any, Callable

from bridge.errors import DuplicateLoweringError


@dataclasses.dataclass(frozen=True)
class Lowering:
    fn: Callable[..., Any]
    random: Any = False       # True, or a predicate(node) -> bool: takes a PRNG key (or None) first
    module: str = ""          # op family that registered it


_REGISTRY: dict[Any, Lowering] = {}
_BY_NAME: dict[str, Lowering] = {}   # ops of libraries bridge does not import, by their printed name
_OVERRIDES: dict[str, Lowering] = {}   # register_lowering(..., override=True): replaces a built-in, by name
_FALLBACKS: list[Callable[[Any], Lowering | None]] = []   # target -> a lowering made for it, or None


def op_name(target: Any) -> str:
    """Stable printable name of a graph target: 'aten.add.Tensor', 'operator.mul'..."""
    if hasattr(target, "_schema") or hasattr(target, "_overloadname"):
        return str(target)
    mod = getattr(target, "__module__", None) or ""
    mod = {"_operator": "operator"}.get(mod, mod)
    return f"{mod}.{getattr(target, '__name__', repr(target))}".lstrip(".")


def _registrar(table: dict, targets: tuple, random: Any) -> Callable[[Callable], Callable]:
    def register(fn: Callable) -> Callable:
        for target in targets:
            if target in table:
                prev = table[target]
                raise DuplicateLoweringError(
                    f"{op_name(target)} already has a lowering ({prev.module}.{prev.fn.__name__}); "
                    f"refusing {fn.__module__}.{fn.__name__}")
            table[target] = Lowering(fn, random, fn.__module__)
        return fn

    return register


def lowering(*targets: Any, random: Any = False) -> Callable[[Callable], Callable]:
    """Register `fn` as the lowering of every target; a second registration raises."""
    return _registrar(_REGISTRY, targets, random)


def lowering_by_name(*names: str, random: Any = False) -> Callable[[Callable], Callable]:
    """Register `fn` for custom ops of a library bridge does not import (they exist only once it is imported),
    keyed by the name `op_name` prints, e.g. 'transformers.grouped_mm_fallback.default'."""
    return _registrar(_BY_NAME, names, random)


def register_lowering(op: Any, fn: Callable | None = None, *, random: bool = False, override: bool = False):
    """Give bridge a JAX implementation of an op (a custom op of your own library, an ATen op missing from the
    registry): `fn` receives the node's arguments with tensors as `jax.Array`s (and a PRNG key first with
    random=True) and returns what the op returns.

    An op that already has a lowering (one of bridge's built-in ATen lowerings, or an earlier registration)
    raises `DuplicateLoweringError` naming the op and the lowering it has; pass `override=True` to replace it
    (a workaround or a faster kernel of your own): conversions from then on use `fn` for that op.

    Example:
        >>> @bridge.register_lowering("mylib::fused_gelu_mul")      # or torch.ops.mylib.fused_gelu_mul
        ... def fused_gelu_mul(x, y):
        ...     return jax.nn.gelu(x, approximate=False) * y
        >>> bridge.register_lowering(torch.ops.aten.gelu.default, my_gelu, override=True)
    """
    importlib.import_module("converters.ops")   # the built-in lowerings, so that a clash with one is seen
    names = _op_names(op)

    def register(f: Callable) -> Callable:
        if override:
            for name in names:
                _OVERRIDES[name] = Lowering(f, random, f.__module__)
            return f
        builtin = {op_name(t): low for t, low in _REGISTRY.items()}
        for name in names:
            prev = _OVERRIDES.get(name) or builtin.get(name) or _BY_NAME.get(name)
            if prev is not None:
                raise DuplicateLoweringError(
                    f"{name} already has a lowering ({prev.module}.{getattr(prev.fn, '__name__', prev.fn)}); "
                    f"refusing {f.__module__}.{getattr(f, '__name__', f)} (pass override=True to replace it)")
        return _registrar(_BY_NAME, names, random)(f)

    return register if fn is None else register(fn)


def _op_names(op: Any) -> tuple[str, ...]:
    """Printed overload names of `op`: 'ns::name' / 'ns::name.overload' strings, OpOverloads, packets (every
    overload), torch.library custom op objects."""
    op = getattr(op, "_opoverload", op)   # a torch.library.custom_op definition
    if isinstance(op, str):
        ns, _, rest = op.partition("::")
        if not rest:
            return (op,)    # already printed: 'ns.name.overload'
        name, _, overload = rest.partition(".")
        return (f"{ns}.{name}.{overload or 'default'}",)
    if hasattr(op, "overloads") and not hasattr(op, "_schema"):   # an OpOverloadPacket
        return tuple(op_name(getattr(op, o)) for o in op.overloads())
    return (op_name(op),)


def fallback(factory: Callable[[Any], Lowering | None]) -> Callable:
    """Register `factory(target)`, asked for a lowering of targets no registration covers (once per target)."""
    _FALLBACKS.append(factory)
    return factory


def lookup(target: Any) -> Lowering | None:
    low = _OVERRIDES.get(op_name(target)) if _OVERRIDES else None
    if low is None:
        low = _REGISTRY.get(target)
    if low is None and _BY_NAME:
        low = _BY_NAME.get(op_name(target))
    if low is None and _FALLBACKS:
        low = _made(target)
    return low


@functools.lru_cache(maxsize=None)
def _made(target: Any) -> Lowering | None:
    return next((low for low in (f(target) for f in _FALLBACKS) if low is not None), None)


def draws_random(node) -> bool:
    """Whether this graph node needs a PRNG key (dropout with p > 0, rand, ...)."""
    low = lookup(node.target)
    if low is None or not low.random:
        return False
    return low.random(node) if callable(low.random) else True


def registered() -> dict[Any, Lowering]:
    """A copy of the whole registry (target → Lowering)."""
    return dict(_REGISTRY)
