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
from typing import Any, Callable

from bridge.errors import DuplicateLoweringError


@dataclasses.dataclass(frozen=True)
class Lowering:
    fn: Callable[..., Any]
    random: Any = False       # True, or a predicate(node) -> bool: takes a PRNG key (or None) first
    module: str = ""          # op family that registered it


_REGISTRY: dict[Any, Lowering] = {}


def op_name(target: Any) -> str:
    """Stable printable name of a graph target: 'aten.add.Tensor', 'operator.mul'..."""
    if hasattr(target, "_schema") or hasattr(target, "_overloadname"):
        return str(target)
    mod = getattr(target, "__module__", None) or ""
    mod = {"_operator": "operator"}.get(mod, mod)
    return f"{mod}.{getattr(target, '__name__', repr(target))}".lstrip(".")


def lowering(*targets: Any, random: Any = False) -> Callable[[Callable], Callable]:
    """Register `fn` as the lowering of every target; a second registration raises."""

    def register(fn: Callable) -> Callable:
        for target in targets:
            if target in _REGISTRY:
                prev = _REGISTRY[target]
                raise DuplicateLoweringError(
                    f"{op_name(target)} already has a lowering ({prev.module}.{prev.fn.__name__}); "
                    f"refusing {fn.__module__}.{fn.__name__}")
            _REGISTRY[target] = Lowering(fn, random, fn.__module__)
        return fn

    return register


def lookup(target: Any) -> Lowering | None:
    return _REGISTRY.get(target)


def draws_random(node) -> bool:
    """Whether this graph node needs a PRNG key (dropout with p > 0, rand, ...)."""
    low = _REGISTRY.get(node.target)
    if low is None or not low.random:
        return False
    return low.random(node) if callable(low.random) else True


def registered() -> dict[Any, Lowering]:
    """A copy of the whole registry (target → Lowering)."""
    return dict(_REGISTRY)
